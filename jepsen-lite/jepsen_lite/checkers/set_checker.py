"""The set checker: no acknowledged add may be lost (Jepsen's ``set`` / ``set-full``).

Workload: ``f="add"`` operations whose invocation ``value`` is an element, unique per
key, and ``f="read"`` operations whose ``ok`` value is the whole set (a JSON list;
``null`` reads as empty). Every key is an independent set; a history that does not
use keys has all its operations on key ``None``.

Definitions (positions are history positions, i.e. real-time order):

- *attempted*: an add was invoked; *acknowledged*: it completed ``ok``; *failed*: it
  completed ``fail`` (so it did not happen); *indeterminate*: ``info`` or no
  completion.
- *final reads*: the ``ok`` reads marked ``extra["final"] = True`` (done after the
  cluster healed); if a key has none, its last ``ok`` read (as Jepsen does).
- an element is *known* from the earlier of its add's ``ok`` completion and the
  completion of the first ``ok`` read containing it.
- **lost**: a known element missing from a final read that was invoked after the
  element became known. (An indeterminate add that some read saw is known too.)
- **unexpected**: a read returned an element no add ever attempted.
- **failed-visible**: a read returned the element of a *failed* add (``fail`` must
  mean "did not happen"; otherwise the client should have said ``info``).
- **duplicated**: a read returned the same element twice.
- *recovered*: an indeterminate add whose element is in a final read (fine).
- *never read*: an acknowledged add with no ``ok`` read invoked after it completed
  (nothing could be expected to see it; not counted as lost).
- *stale*: an element that a read invoked after it became known did not contain,
  although it is not lost. Stale reads are legal for an eventually consistent store;
  with ``allow_stale=False`` they make the history invalid.
- with ``stale_after_ack=True``, staleness is judged only for *acknowledged* adds,
  against the reads invoked after the add's ``ok`` completion (an indeterminate add
  that one read saw may legitimately be missing from the next). That is what
  overlapping strict quorums (R + W > N, primaries only) guarantee: a read sees
  every write acknowledged before it began. Use it with ``allow_stale=False``.

``valid`` is ``False`` if anything is lost, unexpected, failed-visible or duplicated
(or stale, when not allowed); ``"unknown"`` if a key with attempted adds was never
read; ``True`` otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_lite.history import Op, Pair, Validity, freeze, pairs, sort_key, thaw

__all__ = ["SetAnomaly", "SetResult", "check_set"]


@dataclass(frozen=True)
class SetAnomaly:
    """One element with a problem, and the operations that show it."""

    kind: str  # lost | unexpected | failed-visible | duplicated | stale | recovered | never-read
    key: str | None
    element: Any
    add: Pair | None = None
    reads: list[Op] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "element": self.element,
            "add": None if self.add is None else self.add.to_dict(),
            "reads": [r.to_dict() for r in self.reads],
        }


@dataclass(frozen=True)
class SetResult:
    """Counts and anomalies of a set history (see the module docstring)."""

    valid: Validity
    key_count: int = 0
    attempt_count: int = 0
    acknowledged_count: int = 0
    failed_count: int = 0
    indeterminate_count: int = 0
    read_count: int = 0
    final_read_count: int = 0
    ok_count: int = 0  # acknowledged adds present in every final read that followed them
    lost: list[SetAnomaly] = field(default_factory=list)
    unexpected: list[SetAnomaly] = field(default_factory=list)
    failed_visible: list[SetAnomaly] = field(default_factory=list)
    duplicated: list[SetAnomaly] = field(default_factory=list)
    recovered: list[SetAnomaly] = field(default_factory=list)
    stale: list[SetAnomaly] = field(default_factory=list)
    never_read: list[SetAnomaly] = field(default_factory=list)
    unread_keys: list[str | None] = field(default_factory=list)

    @property
    def lost_elements(self) -> list[Any]:
        return [a.element for a in self.lost]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": "set",
            "valid": self.valid,
            "key_count": self.key_count,
            "attempt_count": self.attempt_count,
            "acknowledged_count": self.acknowledged_count,
            "failed_count": self.failed_count,
            "indeterminate_count": self.indeterminate_count,
            "read_count": self.read_count,
            "final_read_count": self.final_read_count,
            "ok_count": self.ok_count,
            "lost_count": len(self.lost),
            "unexpected_count": len(self.unexpected),
            "failed_visible_count": len(self.failed_visible),
            "duplicated_count": len(self.duplicated),
            "recovered_count": len(self.recovered),
            "stale_count": len(self.stale),
            "never_read_count": len(self.never_read),
            "lost_elements": self.lost_elements,
            "lost": [a.to_dict() for a in self.lost],
            "unexpected": [a.to_dict() for a in self.unexpected],
            "failed_visible": [a.to_dict() for a in self.failed_visible],
            "duplicated": [a.to_dict() for a in self.duplicated],
            "recovered": [a.to_dict() for a in self.recovered],
            "stale": [a.to_dict() for a in self.stale],
            "never_read": [a.to_dict() for a in self.never_read],
            "unread_keys": self.unread_keys,
        }


def _completion(p: Pair) -> Op:
    assert p.completion is not None
    return p.completion


def _read_elements(p: Pair) -> list[Hashable]:
    v = _completion(p).value
    if v is None:
        return []
    if not isinstance(v, list | tuple):
        raise ValueError(f"a set read must return a list, got {v!r} at index {p.invoke.index}")
    return [freeze(x) for x in v]


@dataclass
class _Acc:
    """Anomalies and counts accumulated over the keys."""

    lost: list[SetAnomaly] = field(default_factory=list)
    unexpected: list[SetAnomaly] = field(default_factory=list)
    failed_visible: list[SetAnomaly] = field(default_factory=list)
    duplicated: list[SetAnomaly] = field(default_factory=list)
    recovered: list[SetAnomaly] = field(default_factory=list)
    stale: list[SetAnomaly] = field(default_factory=list)
    never_read: list[SetAnomaly] = field(default_factory=list)
    unread: list[str | None] = field(default_factory=list)
    final_reads: int = 0
    ok: int = 0


def _check_key(
    key: str | None,
    key_adds: dict[Hashable, Pair],
    key_reads: list[Pair],
    acc: _Acc,
    stale_after_ack: bool = False,
) -> None:
    contents: list[set[Hashable]] = []
    seen_by: dict[Hashable, list[int]] = defaultdict(list)  # element -> reads containing it
    for ri, r in enumerate(key_reads):
        elems = _read_elements(r)
        contents.append(set(elems))
        counted: set[Hashable] = set()
        for e in elems:
            if e in counted:
                acc.duplicated.append(
                    SetAnomaly("duplicated", key, thaw(e), key_adds.get(e), [_completion(r)])
                )
            else:
                counted.add(e)
                seen_by[e].append(ri)

    def read_ops(indices: list[int]) -> list[Op]:
        return [_completion(key_reads[i]) for i in indices]

    for e in sorted(seen_by, key=lambda x: sort_key(thaw(x))):
        add = key_adds.get(e)
        if add is None:
            acc.unexpected.append(
                SetAnomaly("unexpected", key, thaw(e), None, read_ops(seen_by[e]))
            )
        elif add.is_fail:
            acc.failed_visible.append(
                SetAnomaly("failed-visible", key, thaw(e), add, read_ops(seen_by[e]))
            )

    if not key_reads:
        if key_adds:
            acc.unread.append(key)
        return
    final_idx = [i for i, r in enumerate(key_reads) if r.invoke.extra.get("final")]
    if not final_idx:
        final_idx = [len(key_reads) - 1]
    acc.final_reads += len(final_idx)
    finals = set(final_idx)

    for e in sorted(key_adds, key=lambda x: sort_key(thaw(x))):
        add = key_adds[e]
        if add.is_fail:
            continue
        elem = thaw(e)
        candidates: list[int] = []
        if add.is_ok and add.complete_pos is not None:
            candidates.append(add.complete_pos)
        candidates.extend(
            pos for i in seen_by.get(e, ()) if (pos := key_reads[i].complete_pos) is not None
        )
        in_final = [i for i in final_idx if e in contents[i]]
        if add.is_indeterminate and in_final:
            acc.recovered.append(SetAnomaly("recovered", key, elem, add, read_ops(in_final)))
        if not candidates:
            continue  # indeterminate and never seen: may never have happened
        known = min(candidates)
        missing = [i for i in final_idx if key_reads[i].invoke_pos > known and e not in contents[i]]
        if missing:
            acc.lost.append(SetAnomaly("lost", key, elem, add, read_ops(missing)))
            continue
        later = [i for i, r in enumerate(key_reads) if r.invoke_pos > known]
        if add.is_ok and not later:
            acc.never_read.append(SetAnomaly("never-read", key, elem, add))
            continue
        if stale_after_ack:  # only acknowledged adds, by the reads after the ack
            acked = add.complete_pos if add.is_ok else None
            later = (
                []
                if acked is None
                else [i for i, r in enumerate(key_reads) if r.invoke_pos > acked]
            )
        stale = [i for i in later if i not in finals and e not in contents[i]]
        if stale:
            acc.stale.append(SetAnomaly("stale", key, elem, add, read_ops(stale)))
        if add.is_ok:
            acc.ok += 1


def check_set(
    history: Sequence[Op],
    *,
    add_f: str = "add",
    read_f: str = "read",
    allow_stale: bool = True,
    stale_after_ack: bool = False,
) -> SetResult:
    """Check a set workload history (see the module docstring for the definitions).

    Raises :class:`~jepsen_lite.history.HistoryError` on a malformed history and
    :class:`ValueError` if an element is added twice to the same key or a read does
    not return a list.
    """
    adds: dict[str | None, dict[Hashable, Pair]] = defaultdict(dict)
    reads: dict[str | None, list[Pair]] = defaultdict(list)
    for p in pairs(history):
        if p.f == add_f:
            elem = freeze(p.invoke.value)
            if elem in adds[p.key]:
                raise ValueError(
                    f"element {p.invoke.value!r} added twice to key {p.key!r} "
                    f"(indices {adds[p.key][elem].invoke.index} and {p.invoke.index})"
                )
            adds[p.key][elem] = p
        elif p.f == read_f and p.is_ok:
            reads[p.key].append(p)

    acc = _Acc()
    keys = sorted(set(adds) | set(reads), key=lambda k: (k is not None, k or ""))
    for key in keys:
        _check_key(key, adds.get(key, {}), reads.get(key, []), acc, stale_after_ack)

    all_adds = [p for a in adds.values() for p in a.values()]
    valid: Validity
    if (
        acc.lost
        or acc.unexpected
        or acc.failed_visible
        or acc.duplicated
        or (acc.stale and not allow_stale)
    ):
        valid = False
    elif acc.unread:
        valid = "unknown"
    else:
        valid = True
    return SetResult(
        valid=valid,
        key_count=len(keys),
        attempt_count=len(all_adds),
        acknowledged_count=sum(1 for p in all_adds if p.is_ok),
        failed_count=sum(1 for p in all_adds if p.is_fail),
        indeterminate_count=sum(1 for p in all_adds if p.is_indeterminate),
        read_count=sum(len(r) for r in reads.values()),
        final_read_count=acc.final_reads,
        ok_count=acc.ok,
        lost=acc.lost,
        unexpected=acc.unexpected,
        failed_visible=acc.failed_visible,
        duplicated=acc.duplicated,
        recovered=acc.recovered,
        stale=acc.stale,
        never_read=acc.never_read,
        unread_keys=acc.unread,
    )
