"""The multi-value (sibling) register checker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jepsen_lite.checkers.register import CausalGraph, check_register
from jepsen_lite.history import HistoryRecorder, OpType, pairs


def write(
    rec: HistoryRecorder,
    proc: int,
    value: str,
    seen: list[str] | None = None,
    *,
    outcome: OpType | None = "ok",
    key: str = "k",
) -> None:
    rec.invoke(proc, "write", key, value, extra=None if seen is None else {"seen": seen})
    if outcome is not None:
        rec.complete(proc, outcome, value)


def read(
    rec: HistoryRecorder, proc: int, values: list[Any], *, final: bool = False, key: str = "k"
) -> None:
    rec.invoke(proc, "read", key, extra={"final": True} if final else None)
    rec.ok(proc, values)


def delete(rec: HistoryRecorder, proc: int, seen: list[str] | None, outcome: OpType = "ok") -> None:
    rec.invoke(proc, "delete", "k", extra=None if seen is None else {"seen": seen})
    rec.complete(proc, outcome)


def kinds(rec: HistoryRecorder) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for a in check_register(rec.history).anomalies:
        out.setdefault(a.kind, []).append(a.value)
    return out


def test_concurrent_writes_kept_as_siblings_is_valid(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b")
    read(rec, 2, ["b", "a"], final=True)
    result = check_register(rec.history)
    assert result.valid is True
    assert (result.acknowledged_count, result.present_count, result.final_read_count) == (2, 2, 1)
    json.dumps(result.to_dict())


def test_lost_write_is_reported_with_its_ops(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b")  # no context: must become a sibling, not replace "a"
    read(rec, 2, ["b"], final=True)
    result = check_register(rec.history)
    assert result.valid is False
    [lost] = result.lost
    assert lost.value == "a"
    assert [(op.type, op.f) for op in lost.ops] == [
        ("invoke", "write"),
        ("ok", "write"),
        ("ok", "read"),
    ]
    assert result.to_dict()["lost_values"] == ["a"]
    assert result.to_dict()["anomaly_counts"]["lost"] == 1


def test_superseded_write_is_not_lost(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    read(rec, 1, ["a"])
    write(rec, 1, "b", seen=["a"])
    read(rec, 2, ["b"], final=True)
    result = check_register(rec.history)
    assert result.valid is True
    assert result.superseded_count == 1 and result.present_count == 1


def test_supersession_is_transitive_through_a_superseded_write(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b", seen=["a"], outcome="info")  # timed out, but it happened...
    write(rec, 2, "c", seen=["b"])  # ...because c's context saw it
    read(rec, 3, ["c"], final=True)
    result = check_register(rec.history)
    assert result.valid is True
    assert result.superseded_count == 2


def test_a_failed_write_supersedes_nothing(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b", seen=["a"], outcome="fail")
    read(rec, 2, [], final=True)
    assert kinds(rec) == {"lost": ["a"]}


def test_info_write_that_later_appears_is_recovered(rec: HistoryRecorder) -> None:
    write(rec, 0, "a", outcome="info")
    write(rec, 1, "b", outcome="info")
    write(rec, 2, "c", outcome=None)  # never completed
    read(rec, 3, ["a", "c"], final=True)
    result = check_register(rec.history)
    assert result.valid is True
    assert result.recovered_count == 2 and result.indeterminate_count == 3


def test_phantom_value_is_reported(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    read(rec, 1, ["a", "ghost"], final=True)
    assert kinds(rec) == {"phantom": ["ghost"]}


def test_value_of_a_failed_write_must_not_appear(rec: HistoryRecorder) -> None:
    write(rec, 0, "a", outcome="fail")
    read(rec, 1, ["a"])
    assert kinds(rec) == {"failed-visible": ["a"]}


def test_value_read_before_its_write_was_invoked(rec: HistoryRecorder) -> None:
    read(rec, 1, ["a"])
    write(rec, 0, "a")
    read(rec, 1, ["a"], final=True)
    assert kinds(rec) == {"future-read": ["a"]}


def test_value_returned_with_its_own_descendant(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b", seen=["a"])
    write(rec, 1, "c", seen=["b"])
    read(rec, 2, ["a", "c"])  # c descends from a through b
    read(rec, 2, ["c"], final=True)
    result = check_register(rec.history)
    assert result.valid is False
    [a] = result.anomalies
    assert (a.kind, a.value) == ("superseded-sibling", "a")
    assert "'c'" in a.detail


def test_value_deleted_by_an_acknowledged_delete_must_not_come_back(
    rec: HistoryRecorder,
) -> None:
    write(rec, 0, "a")
    read(rec, 1, ["a"])
    delete(rec, 1, ["a"])
    read(rec, 2, [])
    result = check_register(rec.history)
    assert result.valid == "unknown"  # no final read yet
    assert result.keys_without_final_read == ["k"]
    read(rec, 2, ["a"], final=True)  # zombie
    result = check_register(rec.history)
    assert result.valid is False
    assert [(a.kind, a.value) for a in result.anomalies] == [("resurrected", "a")]


def test_resurrection_through_a_descendant(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 0, "b", seen=["a"], outcome="info")
    write(rec, 1, "c", seen=["b"])  # acknowledged: a and b are gone for good
    read(rec, 2, ["a", "c"], final=True)
    found = kinds(rec)
    assert found["resurrected"] == ["a"]
    assert found["superseded-sibling"] == ["a"]


def test_deletes_with_and_without_context_supersede(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    delete(rec, 0, ["a"])
    write(rec, 1, "b")
    delete(rec, 1, None)  # blind delete: whatever the server found
    read(rec, 2, [], final=True)
    result = check_register(rec.history)
    assert result.valid is True and result.superseded_count == 2


def test_blind_delete_does_not_cover_later_writes(rec: HistoryRecorder) -> None:
    delete(rec, 1, None)
    write(rec, 0, "a")
    read(rec, 2, [], final=True)
    assert kinds(rec) == {"lost": ["a"]}


def test_acknowledged_write_after_the_final_read_is_unverified(rec: HistoryRecorder) -> None:
    read(rec, 2, [], final=True)
    write(rec, 0, "a")
    result = check_register(rec.history)
    assert result.valid == "unknown"
    assert [u.value for u in result.unverified] == ["a"]


def test_values_must_be_unique_per_key(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 0, "a", key="other")  # another key: fine
    assert check_register(rec.history).key_count == 2
    write(rec, 1, "a")
    with pytest.raises(ValueError, match="written twice"):
        check_register(rec.history)


def test_causal_graph_descendants_and_covers(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 0, "b", seen=["a"])
    write(rec, 1, "c", seen=["b", "x"])
    write(rec, 1, "d", seen=["a"], outcome="fail")
    g = CausalGraph(pairs(rec.history))
    assert g.descendants("a") == {"b", "c"}
    assert g.descendants("c") == frozenset()
    assert g.covers({"c"}, "a") and not g.covers({"x"}, "a")
    assert g.is_superseded("x") and not g.is_superseded("d")
