"""The convergence and session-guarantee checkers."""

from __future__ import annotations

import json
from typing import Any

from jepsen_lite.checkers.convergence import check_convergence
from jepsen_lite.checkers.session import check_session
from jepsen_lite.history import HistoryRecorder


def test_identical_replicas_converge() -> None:
    states = {
        "n1": {"a": ["x", "y"], "b": []},
        "n2": {"a": ["y", "x"]},  # order does not matter; missing key = no values
        "n3": {"a": ["x", "y"], "b": []},
    }
    result = check_convergence(states)
    assert result.valid is True
    assert (result.replica_count, result.key_count) == (3, 2)
    json.dumps(result.to_dict())


def test_divergent_keys_are_reported_per_replica() -> None:
    states = {
        "n1": {"a": ["x"], "b": ["1"], "c": ["q"]},
        "n2": {"a": ["x", "y"], "b": ["1"]},
        "n3": {"a": ["x"], "b": ["1"], "c": ["q"]},
    }
    result = check_convergence(states)
    assert result.valid is False
    assert result.divergent_keys == ["a", "c"]
    a = result.divergent[0]
    assert a.values == {"n1": ["x"], "n2": ["x", "y"], "n3": ["x"]}
    assert a.groups == [["n1", "n3"], ["n2"]]
    assert result.to_dict()["divergent_count"] == 2


def test_duplicate_sibling_values_count_as_a_difference() -> None:
    assert check_convergence({"n1": {"a": ["x", "x"]}, "n2": {"a": ["x"]}}).valid is False


def test_owners_restrict_the_comparison_to_a_keys_replicas() -> None:
    states: dict[str, dict[str, list[Any]]] = {
        "n1": {"a": ["x"]},
        "n2": {"a": ["x"], "b": ["y"]},
        "n3": {"b": ["y"]},
    }
    owners = {"a": ["n1", "n2"], "b": ["n2", "n3"]}
    assert check_convergence(states).valid is False
    assert check_convergence(states, owners=owners).valid is True
    owners["b"] = ["n2", "n3", "n4"]  # n4 did not report
    result = check_convergence(states, owners=owners)
    assert result.valid == "unknown" and result.unreported == {"b": ["n4"]}


def test_single_replica_cannot_show_convergence() -> None:
    assert check_convergence({"n1": {"a": ["x"]}}).valid == "unknown"
    result = check_convergence({"n1": {}, "n2": {}}, expected_keys=["gone"])
    assert result.valid is True and result.missing_everywhere == ["gone"]


# ----------------------------------------------------------------------------- session


def write(rec: HistoryRecorder, proc: int, value: str, seen: list[str] | None = None) -> None:
    rec.invoke(proc, "write", "k", value, extra=None if seen is None else {"seen": seen})
    rec.ok(proc, value)


def read(rec: HistoryRecorder, proc: int, values: list[str]) -> None:
    rec.invoke(proc, "read", "k")
    rec.ok(proc, values)


def test_session_guarantees_hold(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    read(rec, 0, ["a"])
    write(rec, 1, "b", seen=["a"])  # another client supersedes a
    read(rec, 0, ["b"])  # a descendant of a covers a
    rec.invoke(1, "delete", "k", extra={"seen": ["b"]})
    rec.ok(1)
    read(rec, 0, [])  # a and b were deleted
    result = check_session(rec.history)
    assert result.valid is True
    assert (result.process_count, result.read_count, result.write_count) == (2, 3, 3)
    json.dumps(result.to_dict())


def test_read_your_writes_violation(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    write(rec, 1, "b")
    read(rec, 0, ["b"])  # process 0 does not see its own write
    result = check_session(rec.history)
    assert result.valid is False
    [v] = result.read_your_writes
    assert (v.process, v.values, v.earlier.f, v.read.value) == (0, ["a"], "write", ["b"])
    assert result.monotonic_reads == []
    assert check_session(rec.history, read_your_writes=False).valid is True


def test_read_your_deletes_violation(rec: HistoryRecorder) -> None:
    write(rec, 0, "a")
    rec.invoke(0, "delete", "k", extra={"seen": ["a"]})
    rec.ok(0)
    read(rec, 0, ["a"])
    result = check_session(rec.history)
    assert result.valid is False
    assert [v.values for v in result.read_your_writes] == [["a"]]


def test_monotonic_reads_violation(rec: HistoryRecorder) -> None:
    write(rec, 1, "a")
    write(rec, 1, "b")
    read(rec, 0, ["a", "b"])
    read(rec, 0, ["b"])  # a went missing without being superseded
    read(rec, 2, ["b"])  # another session: no constraint
    result = check_session(rec.history)
    assert result.valid is False
    [v] = result.monotonic_reads
    assert (v.process, v.values) == (0, ["a"])
    assert v.earlier.value == ["a", "b"] and v.read.value == ["b"]
    assert check_session(rec.history, monotonic_reads=False).valid is True


def test_unacknowledged_writes_do_not_bind_the_session(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", "a")
    rec.info(0)
    rec.invoke(1, "write", "k", "b")
    rec.fail(1)
    read(rec, 0, [])
    read(rec, 1, [])
    assert check_session(rec.history).valid is True
