"""The history model: ops, JSON lines, pairing and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jepsen_lite.history import (
    HistoryError,
    HistoryRecorder,
    Op,
    dump_jsonl,
    dumps_jsonl,
    freeze,
    load_jsonl,
    loads_jsonl,
    merge_validity,
    pairs,
    thaw,
    validate,
)


def test_op_json_round_trip_keeps_every_field(tmp_path: Path, rec: HistoryRecorder) -> None:
    rec.invoke(1, "write", "k", "v1", extra={"seen": ["v0"], "node": "n2"})
    rec.ok(1, "v1")
    rec.invoke(2, "cas", "k", [1, 2])
    rec.info(2, [1, 2], extra={"error": "timeout"})
    rec.invoke(3, "read", None)
    history = rec.history
    path = tmp_path / "history.jsonl"
    dump_jsonl(history, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first == {
        "index": 0,
        "type": "invoke",
        "process": 1,
        "time": 0,
        "f": "write",
        "key": "k",
        "value": "v1",
        "extra": {"seen": ["v0"], "node": "n2"},
    }
    assert "extra" not in json.loads(lines[1])  # empty extra is omitted
    loaded = load_jsonl(path)
    assert loaded == history
    assert loads_jsonl(dumps_jsonl(history)) == history


def test_ops_with_list_values_are_hashable() -> None:
    a = Op(0, "invoke", 0, 0, "cas", "k", [1, 2], {"x": [1]})
    b = Op(0, "invoke", 0, 0, "cas", "k", [1, 2], {"x": [1]})
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1


def test_pairs_matches_invocations_with_their_completions(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.invoke(1, "write", "k", 2)
    rec.invoke(2, "read", "k")
    rec.fail(1, 2)
    rec.ok(0, 1)
    rec.info(2)
    rec.invoke(1, "read", "k")  # process 1 is free again after its fail
    ps = pairs(rec.history)
    assert [(p.process, p.type) for p in ps] == [(0, "ok"), (1, "fail"), (2, "info"), (1, "info")]
    assert ps[0].invoke_pos == 0 and ps[0].complete_pos == 4
    assert ps[1].is_fail and not ps[1].is_indeterminate
    assert ps[2].is_indeterminate and ps[2].completion is not None
    assert ps[3].completion is None and ps[3].complete_pos is None and ps[3].is_indeterminate


def _op(index: int, typ: str, process: int, f: str = "read", time: int | None = None) -> Op:
    return Op.from_dict(
        {
            "index": index,
            "type": typ,
            "process": process,
            "time": index if time is None else time,
            "f": f,
            "key": "k",
        }
    )


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([_op(0, "ok", 1)], "completion without an outstanding invocation by process 1"),
        ([_op(0, "invoke", 1), _op(1, "invoke", 1)], "already has an outstanding invocation"),
        ([_op(0, "invoke", 1), _op(1, "ok", 1, f="write")], "f/key differ"),
        ([_op(1, "invoke", 1), _op(1, "ok", 1)], "index 1 does not increase"),
        ([_op(0, "invoke", 1, time=5), _op(1, "ok", 1, time=4)], "time 4 goes backwards"),
        (
            [_op(0, "invoke", 1), _op(1, "info", 1), _op(2, "info", 1)],
            "completion without an outstanding invocation",
        ),
    ],
)
def test_validation_rejects_malformed_histories(history: list[Op], message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        validate(history)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"index": 0, "type": "invoke", "process": 0, "time": 0}', "missing field 'f'"),
        ('{"index": 0, "type": "done", "process": 0, "time": 0, "f": "r"}', "type must be"),
        ('{"index": 0, "type": "ok", "process": "a", "time": 0, "f": "r"}', "process must be"),
        ('{"index": 0, "type": "ok", "process": 0, "time": 0, "f": "r", "x": 1}', "unknown"),
        ('{"index": 0, "type": "ok", "process": 0, "time": 0, "f": "r", "key": 3}', "key must"),
        ('{"index": true, "type": "ok", "process": 0, "time": 0, "f": "r"}', "index must be"),
    ],
)
def test_jsonl_parse_errors_name_the_line(line: str, message: str) -> None:
    good = '{"index": 0, "type": "invoke", "process": 9, "time": 0, "f": "read"}'
    with pytest.raises(HistoryError, match=message) as exc:
        loads_jsonl(good + "\n" + line + "\n", source="h.jsonl")
    assert "h.jsonl:2" in str(exc.value)


def test_load_jsonl_validates_unless_told_not_to(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"index": 0, "type": "ok", "process": 0, "time": 0, "f": "read"}\n')
    with pytest.raises(HistoryError, match="completion without"):
        load_jsonl(path)
    assert len(load_jsonl(path, check=False)) == 1


def test_recorder_refuses_invalid_sequences(rec: HistoryRecorder) -> None:
    rec.invoke(0, "read", "k")
    with pytest.raises(HistoryError, match="outstanding"):
        rec.invoke(0, "read", "k")
    with pytest.raises(HistoryError, match="no outstanding"):
        rec.ok(1)
    with pytest.raises(HistoryError, match="ok, fail or info"):
        rec.complete(0, "invoke")
    done = rec.ok(0, 5)
    assert (done.f, done.key, done.value, done.time) == ("read", "k", 5, 10)
    validate(rec.history)


def test_recorder_never_lets_time_go_backwards() -> None:
    times = iter([100, 50, 70])
    r = HistoryRecorder(clock=lambda: next(times))
    r.invoke(0, "read", "k")
    r.invoke(1, "read", "k")
    r.ok(0)
    assert [op.time for op in r.history] == [100, 100, 100]
    validate(r.history)


def test_merge_validity_false_beats_unknown_beats_true() -> None:
    assert merge_validity([]) is True
    assert merge_validity([True, True]) is True
    assert merge_validity([True, "unknown"]) == "unknown"
    assert merge_validity(["unknown", False, True]) is False


def test_freeze_and_thaw_are_inverse_on_json_values() -> None:
    value = {"a": [1, {"b": None}], "c": "x"}
    frozen = freeze(value)
    hash(frozen)
    assert thaw(frozen) == value
    assert freeze([1, 2]) != freeze({"1": 2})
