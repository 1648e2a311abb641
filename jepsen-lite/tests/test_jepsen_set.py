"""The set checker."""

from __future__ import annotations

import json

import pytest
from jepsen_lite.checkers.set_checker import check_set
from jepsen_lite.history import HistoryRecorder, OpType


def _add(
    rec: HistoryRecorder, proc: int, value: int, outcome: OpType | None = "ok", key: str = "s"
) -> None:
    rec.invoke(proc, "add", key, value)
    if outcome is not None:
        rec.complete(proc, outcome, value)


def _read(
    rec: HistoryRecorder, proc: int, values: list[int], *, final: bool = False, key: str = "s"
) -> None:
    rec.invoke(proc, "read", key, extra={"final": True} if final else None)
    rec.ok(proc, values)


def test_all_acknowledged_adds_present_is_valid(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _add(rec, 1, 2)
    _add(rec, 2, 3, "fail")
    _read(rec, 0, [2, 1], final=True)
    result = check_set(rec.history)
    assert result.valid is True
    assert (result.attempt_count, result.acknowledged_count, result.failed_count) == (3, 2, 1)
    assert result.ok_count == 2 and result.final_read_count == 1
    assert result.lost == [] and result.unexpected == []
    json.dumps(result.to_dict())


def test_lost_add_is_reported_with_its_ops(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _add(rec, 0, 2)
    _add(rec, 0, 3)
    _read(rec, 1, [1, 3], final=True)
    result = check_set(rec.history)
    assert result.valid is False
    assert result.lost_elements == [2]
    [lost] = result.lost
    assert lost.add is not None and lost.add.invoke.value == 2
    assert [r.value for r in lost.reads] == [[1, 3]]
    d = result.to_dict()
    assert d["lost_count"] == 1 and d["lost_elements"] == [2]
    assert d["lost"][0]["add"]["invoke"]["value"] == 2


def test_last_read_is_the_final_read_when_none_is_marked(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _read(rec, 1, [1])
    _read(rec, 1, [])  # the last read lost it
    result = check_set(rec.history)
    assert result.valid is False and result.lost_elements == [1]


def test_element_seen_then_missing_is_lost_even_if_its_add_timed_out(
    rec: HistoryRecorder,
) -> None:
    _add(rec, 0, 7, "info")
    _read(rec, 1, [7])
    _read(rec, 1, [], final=True)
    result = check_set(rec.history)
    assert result.valid is False and result.lost_elements == [7]


def test_unexpected_element_is_reported(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _read(rec, 1, [1, 42], final=True)
    result = check_set(rec.history)
    assert result.valid is False
    assert [a.element for a in result.unexpected] == [42]
    assert result.unexpected[0].add is None


def test_failed_add_that_shows_up_is_reported(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1, "fail")
    _read(rec, 1, [1], final=True)
    result = check_set(rec.history)
    assert result.valid is False
    assert [a.element for a in result.failed_visible] == [1]


def test_info_adds_may_be_recovered_or_absent(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1, "info")
    _add(rec, 1, 2, "info")
    _add(rec, 2, 3, None)  # never completed
    _read(rec, 3, [1, 3], final=True)
    result = check_set(rec.history)
    assert result.valid is True
    assert sorted(a.element for a in result.recovered) == [1, 3]
    assert result.indeterminate_count == 3


def test_duplicate_elements_in_a_read_are_invalid(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _read(rec, 1, [1, 1], final=True)
    result = check_set(rec.history)
    assert result.valid is False and [a.element for a in result.duplicated] == [1]


def test_stale_reads_are_counted_and_optionally_invalid(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _read(rec, 1, [])  # began after the add was acknowledged: stale
    _read(rec, 1, [1], final=True)
    result = check_set(rec.history)
    assert result.valid is True
    assert [a.element for a in result.stale] == [1]
    assert check_set(rec.history, allow_stale=False).valid is False


def test_read_concurrent_with_add_is_neither_lost_nor_stale(rec: HistoryRecorder) -> None:
    rec.invoke(0, "add", "s", 1)
    rec.invoke(1, "read", "s", extra={"final": True})
    rec.ok(0, 1)
    rec.ok(1, [])
    result = check_set(rec.history)
    assert result.valid is True
    assert result.lost == [] and result.stale == []
    assert [a.element for a in result.never_read] == [1]


def test_never_read_set_is_unknown(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    rec.invoke(1, "read", "s")
    rec.fail(1)
    result = check_set(rec.history)
    assert result.valid == "unknown"
    assert result.unread_keys == ["s"]


def test_keys_are_independent_sets(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1, key="a")
    _add(rec, 0, 1, key="b")  # the same element in another set is fine
    _read(rec, 1, [1], final=True, key="a")
    _read(rec, 1, [], final=True, key="b")
    result = check_set(rec.history)
    assert result.valid is False
    assert [(a.key, a.element) for a in result.lost] == [("b", 1)]
    assert result.key_count == 2


def test_multiple_final_reads_must_all_hold_every_acknowledged_add(
    rec: HistoryRecorder,
) -> None:
    _add(rec, 0, 1)
    _read(rec, 1, [1], final=True)
    _read(rec, 2, [], final=True)
    result = check_set(rec.history)
    assert result.valid is False
    assert [r.process for r in result.lost[0].reads] == [2]


def test_adding_the_same_element_twice_is_rejected(rec: HistoryRecorder) -> None:
    _add(rec, 0, 1)
    _add(rec, 0, 1)
    with pytest.raises(ValueError, match="added twice"):
        check_set(rec.history)


def test_reads_must_return_lists(rec: HistoryRecorder) -> None:
    rec.invoke(0, "read", "s")
    rec.ok(0, 5)
    with pytest.raises(ValueError, match="must return a list"):
        check_set(rec.history)


def test_element_is_known_from_the_earliest_completed_read_that_saw_it(
    rec: HistoryRecorder,
) -> None:
    rec.invoke(0, "add", "s", 1)
    rec.invoke(1, "read", "s")  # long read, invoked first, completes last
    rec.invoke(2, "read", "s")
    rec.ok(2, [1])  # this one completes first: 1 is known from here
    rec.invoke(3, "read", "s", extra={"final": True})
    rec.ok(3, [])
    rec.ok(1, [1])
    rec.info(0, 1)
    result = check_set(rec.history)
    assert result.valid is False and result.lost_elements == [1]
