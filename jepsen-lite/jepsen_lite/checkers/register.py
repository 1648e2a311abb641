"""Multi-value register checker for a store that keeps concurrent writes as siblings.

Workload (per key; keys are independent):

- ``f="write"`` (or ``"put"``): the invocation ``value`` is the written value, unique
  per key. If the write passed a causal context, ``extra["seen"]`` lists the values
  returned by the read whose context it used; a write without a context has no
  ``seen`` (or an empty one) and supersedes nothing.
- ``f="delete"``: deletes with a context; ``extra["seen"]`` as for a write. A delete
  without ``seen`` (the server read the key and deleted what it found, so the client
  does not know what that was) is *blind*: it is assumed to supersede every value
  whose write was invoked before the delete completed. That can hide a lost write
  but never reports a false one.
- ``f="read"`` (or ``"get"``): the ``ok`` value is the list of sibling values
  (``null`` = none). Reads done after the cluster healed and converged are marked
  ``extra["final"] = True`` on the invocation.

A value ``v`` is *superseded* if some write or delete that did not ``fail`` (``ok``,
``info`` or never completed) has ``v`` in its ``seen``. A value superseded by a write
that was itself superseded is still superseded: supersession only needs the
superseding write to exist, not to survive. ``v`` *descends* from ``u`` if a chain of
writes leads from ``u`` to ``v`` (``u`` in the ``seen`` of the write of ``w1``, ``w1`` in
the ``seen`` of the write of ``w2``, ..., ``v``).

The checker reports (each makes the history invalid):

- **phantom**: a read returned a value no write on that key ever attempted;
- **failed-visible**: a read returned the value of a write that completed ``fail``
  (``fail`` must mean "did not happen"; an unsure outcome must be ``info``);
- **future-read**: a read returned a value whose write was invoked only after the
  read completed;
- **superseded-sibling**: a read returned a value together with a value descending
  from it (a context covers its causal past, so the two can never be siblings);
- **lost**: an acknowledged (``ok``) write whose value is not superseded and is
  missing from a final read invoked after the write completed;
- **resurrected**: a final read returned a value that an acknowledged write or
  delete had superseded (directly, or by superseding a descendant of it) before the
  final read began.

Not anomalies: an ``info`` write whose value shows up (*recovered*), an ``info`` write
that never shows up, stale non-final reads. ``valid`` is ``"unknown"`` when nothing is
wrong but a key that was written has no final read, or some acknowledged,
unsuperseded write could not be verified because no final read began after it
completed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_lite.history import Op, Pair, Validity, freeze, pairs, sort_key, thaw

__all__ = [
    "FINAL",
    "SEEN",
    "CausalGraph",
    "RegisterAnomaly",
    "RegisterResult",
    "check_register",
    "read_values",
]

SEEN = "seen"
"""``extra`` field of a write/delete: the values its causal context had seen."""
FINAL = "final"
"""``extra`` field of a read invocation: a final read, after healing and convergence."""

WRITE_FS = frozenset({"write", "put"})
DELETE_FS = frozenset({"delete"})
READ_FS = frozenset({"read", "get"})


def _completion(p: Pair) -> Op:
    assert p.completion is not None
    return p.completion


def read_values(p: Pair) -> list[Hashable]:
    """The sibling values an ``ok`` read returned (frozen, in order)."""
    v = _completion(p).value
    if v is None:
        return []
    if not isinstance(v, list | tuple):
        raise ValueError(
            f"a register read must return a list of siblings, got {v!r} at index {p.invoke.index}"
        )
    return [freeze(x) for x in v]


def _seen(p: Pair) -> list[Hashable]:
    s = p.invoke.extra.get(SEEN)
    if s is None:
        return []
    if not isinstance(s, list | tuple):
        raise ValueError(f"extra[{SEEN!r}] must be a list, got {s!r} at index {p.invoke.index}")
    return [freeze(x) for x in s]


class CausalGraph:
    """The writes of one key and the supersession relation recorded by their contexts."""

    def __init__(self, key_pairs: Iterable[Pair]) -> None:
        self.writes: dict[Hashable, Pair] = {}
        self.deletes: list[Pair] = []
        self.blind_deletes: list[Pair] = []  # deletes without ``seen``, that did not fail
        self.reads: list[Pair] = []
        self.seen: dict[int, list[Hashable]] = {}  # invoke index -> seen values
        self.superseders: dict[Hashable, list[Pair]] = defaultdict(list)
        self._children: dict[Hashable, set[Hashable]] = defaultdict(set)
        self._desc: dict[Hashable, frozenset[Hashable]] = {}
        self._deleted: dict[Hashable, bool] = {}
        for p in key_pairs:
            if p.f in DELETE_FS and SEEN not in p.invoke.extra:
                if not p.is_fail:
                    self.blind_deletes.append(p)
                continue
            if p.f in WRITE_FS or p.f in DELETE_FS:
                seen = _seen(p)
                self.seen[p.invoke.index] = seen
                if p.f in WRITE_FS:
                    v = freeze(p.invoke.value)
                    if v in self.writes:
                        raise ValueError(
                            f"value {p.invoke.value!r} written twice to key {p.key!r} "
                            f"(indices {self.writes[v].invoke.index} and {p.invoke.index}); "
                            "write values must be unique"
                        )
                    self.writes[v] = p
                else:
                    self.deletes.append(p)
                if p.is_fail:
                    continue
                for s in seen:
                    self.superseders[s].append(p)
                    if p.f in WRITE_FS:
                        self._children[s].add(freeze(p.invoke.value))
            elif p.f in READ_FS and p.is_ok:
                self.reads.append(p)

    def _blindly_deleted(self, values: Iterable[Hashable]) -> bool:
        for v in values:
            w = self.writes.get(v)
            if w is None:
                continue
            for d in self.blind_deletes:
                if d.complete_pos is None or w.invoke_pos < d.complete_pos:
                    return True
        return False

    def is_superseded(self, v: Hashable) -> bool:
        """Some write or delete that did not fail had ``v`` in its context (or a blind
        delete that completed after ``v``'s write was invoked may have deleted it)."""
        return bool(self.superseders.get(v)) or self._blindly_deleted([v])

    def descendants(self, v: Hashable) -> frozenset[Hashable]:
        """Values written (by writes that did not fail) with ``v`` in their causal past."""
        cached = self._desc.get(v)
        if cached is not None:
            return cached
        out: set[Hashable] = set()
        todo = deque(self._children.get(v, ()))
        while todo:
            x = todo.popleft()
            if x in out or x == v:
                continue
            out.add(x)
            todo.extend(self._children.get(x, ()))
        result = frozenset(out)
        self._desc[v] = result
        return result

    def lineage(self, v: Hashable) -> frozenset[Hashable]:
        """``v`` and its descendants."""
        return self.descendants(v) | {v}

    def deleted_after(self, v: Hashable) -> bool:
        """Some delete that did not fail superseded ``v`` or a descendant of it."""
        cached = self._deleted.get(v)
        if cached is None:
            lin = self.lineage(v)
            cached = self._blindly_deleted(lin) or any(
                not d.is_fail and lin.intersection(self.seen[d.invoke.index]) for d in self.deletes
            )
            self._deleted[v] = cached
        return cached

    def covers(self, values: set[Hashable], v: Hashable) -> bool:
        """A read returning ``values`` is at least as new as ``v``: it holds ``v`` or a
        descendant of it, or a delete superseded ``v``'s lineage (so absence is fine)."""
        return v in values or bool(self.descendants(v) & values) or self.deleted_after(v)


@dataclass(frozen=True)
class RegisterAnomaly:
    """A problem with one value, and the operations that show it."""

    kind: str
    key: str | None
    value: Any
    ops: list[Op] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "value": self.value,
            "detail": self.detail,
            "ops": [o.to_dict() for o in self.ops],
        }


ANOMALY_KINDS = (
    "phantom",
    "failed-visible",
    "future-read",
    "superseded-sibling",
    "lost",
    "resurrected",
)


@dataclass(frozen=True)
class RegisterResult:
    """Counts and anomalies of a multi-value register history."""

    valid: Validity
    key_count: int = 0
    write_count: int = 0
    acknowledged_count: int = 0
    failed_count: int = 0
    indeterminate_count: int = 0
    superseded_count: int = 0
    read_count: int = 0
    final_read_count: int = 0
    present_count: int = 0  # acknowledged, unsuperseded writes found in the final reads
    recovered_count: int = 0  # indeterminate writes found in the final reads
    anomalies: list[RegisterAnomaly] = field(default_factory=list)
    unverified: list[RegisterAnomaly] = field(default_factory=list)
    keys_without_final_read: list[str | None] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[RegisterAnomaly]:
        return [a for a in self.anomalies if a.kind == kind]

    @property
    def lost(self) -> list[RegisterAnomaly]:
        return self.of_kind("lost")

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": "register",
            "valid": self.valid,
            "key_count": self.key_count,
            "write_count": self.write_count,
            "acknowledged_count": self.acknowledged_count,
            "failed_count": self.failed_count,
            "indeterminate_count": self.indeterminate_count,
            "superseded_count": self.superseded_count,
            "read_count": self.read_count,
            "final_read_count": self.final_read_count,
            "present_count": self.present_count,
            "recovered_count": self.recovered_count,
            "anomaly_counts": {k: len(self.of_kind(k)) for k in ANOMALY_KINDS},
            "lost_values": [a.value for a in self.lost],
            "anomalies": [a.to_dict() for a in self.anomalies],
            "unverified": [a.to_dict() for a in self.unverified],
            "keys_without_final_read": self.keys_without_final_read,
        }


@dataclass
class _Acc:
    anomalies: list[RegisterAnomaly] = field(default_factory=list)
    unverified: list[RegisterAnomaly] = field(default_factory=list)
    unfinished_keys: list[str | None] = field(default_factory=list)
    superseded: int = 0
    final_reads: int = 0
    present: int = 0
    recovered: int = 0


def _check_key(key: str | None, g: CausalGraph, acc: _Acc) -> None:
    def add(kind: str, v: Hashable, ops: list[Op], detail: str) -> None:
        acc.anomalies.append(RegisterAnomaly(kind, key, thaw(v), ops, detail))

    contents = [read_values(r) for r in g.reads]
    # (a) Every read value was written, by a write that did not fail, invoked in time.
    for r, vals in zip(g.reads, contents, strict=True):
        done = _completion(r)
        valset = set(vals)
        for v in sorted(valset, key=lambda x: sort_key(thaw(x))):
            w = g.writes.get(v)
            if w is None:
                add("phantom", v, [r.invoke, done], "read a value that was never written")
            elif w.is_fail:
                add("failed-visible", v, [w.invoke, _completion(w), done], "write failed")
            elif r.complete_pos is not None and w.invoke_pos > r.complete_pos:
                add("future-read", v, [done, w.invoke], "write invoked after the read completed")
            newer = g.descendants(v) & valset
            if newer:
                u = min(newer, key=lambda x: sort_key(thaw(x)))
                uw = g.writes[u]
                add(
                    "superseded-sibling",
                    v,
                    [uw.invoke, done],
                    f"returned together with {thaw(u)!r}, whose write had seen it",
                )

    finals = [(r, set(fvals)) for r, fvals in zip(g.reads, contents, strict=True)]
    finals = [(r, fvals) for r, fvals in finals if r.invoke.extra.get(FINAL)]
    acc.final_reads += len(finals)
    if not finals and any(not w.is_fail for w in g.writes.values()):
        acc.unfinished_keys.append(key)

    # (b) Acknowledged writes are in the final reads unless superseded.
    for v in sorted(g.writes, key=lambda x: sort_key(thaw(x))):
        w = g.writes[v]
        if w.is_fail:
            continue
        if g.is_superseded(v):
            acc.superseded += 1
            continue
        after = [(r, fvals) for r, fvals in finals if r.invoke_pos > (w.complete_pos or 0)]
        if w.is_indeterminate:
            if any(v in fvals for _, fvals in finals):
                acc.recovered += 1
            continue
        if not after:
            acc.unverified.append(
                RegisterAnomaly(
                    "unverified",
                    key,
                    thaw(v),
                    [w.invoke, _completion(w)],
                    "no final read began after this acknowledged write completed",
                )
            )
            continue
        missing = [r for r, fvals in after if v not in fvals]
        if missing:
            add(
                "lost",
                v,
                [w.invoke, _completion(w), *(_completion(r) for r in missing)],
                "acknowledged, never superseded, missing from the final read(s)",
            )
        else:
            acc.present += 1

    # Resurrection: a final read holds a value an acknowledged write/delete superseded.
    for r, fvals in finals:
        for v in sorted(fvals, key=lambda x: sort_key(thaw(x))):
            lineage = g.lineage(v)
            killers = [
                s
                for x in lineage
                for s in g.superseders.get(x, ())
                if s.is_ok and s.complete_pos is not None and s.complete_pos < r.invoke_pos
            ]
            if killers:
                s = min(killers, key=lambda p: p.invoke_pos)
                add(
                    "resurrected",
                    v,
                    [s.invoke, _completion(s), _completion(r)],
                    f"superseded by the acknowledged {s.f} at index {s.invoke.index}",
                )


def check_register(history: Sequence[Op]) -> RegisterResult:
    """Check a multi-value register history (see the module docstring).

    Raises :class:`~jepsen_lite.history.HistoryError` on a malformed history and
    :class:`ValueError` if a value is written twice to a key or a read or ``seen`` is
    not a list.
    """
    by_key: dict[str | None, list[Pair]] = defaultdict(list)
    for p in pairs(history):
        by_key[p.key].append(p)
    keys = sorted(by_key, key=lambda k: (k is not None, k or ""))
    graphs = {k: CausalGraph(by_key[k]) for k in keys}
    acc = _Acc()
    for k in keys:
        _check_key(k, graphs[k], acc)
    writes = [w for g in graphs.values() for w in g.writes.values()]
    valid: Validity
    if acc.anomalies:
        valid = False
    elif acc.unverified or acc.unfinished_keys:
        valid = "unknown"
    else:
        valid = True
    return RegisterResult(
        valid=valid,
        key_count=len(keys),
        write_count=len(writes),
        acknowledged_count=sum(1 for w in writes if w.is_ok),
        failed_count=sum(1 for w in writes if w.is_fail),
        indeterminate_count=sum(1 for w in writes if w.is_indeterminate),
        superseded_count=acc.superseded,
        read_count=sum(len(g.reads) for g in graphs.values()),
        final_read_count=acc.final_reads,
        present_count=acc.present,
        recovered_count=acc.recovered,
        anomalies=acc.anomalies,
        unverified=acc.unverified,
        keys_without_final_read=acc.unfinished_keys,
    )
