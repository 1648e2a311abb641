"""The per-key linearizability checker (hand-made histories)."""

from __future__ import annotations

import json

import pytest
from jepsen_lite.checkers.linearizable import (
    UNKNOWN,
    CASRegisterModel,
    KVRegisterModel,
    check_linearizable,
    check_pairs,
)
from jepsen_lite.history import HistoryRecorder, Op, pairs


def test_sequential_cas_register_history_is_linearizable(rec: HistoryRecorder) -> None:
    rec.invoke(0, "read", "k")
    rec.ok(0, None)
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(1, "cas", "k", [1, 2])
    rec.ok(1, [1, 2])
    rec.invoke(1, "read", "k")
    rec.ok(1, 2)
    result = check_linearizable(rec.history, CASRegisterModel())
    assert result.valid is True
    assert (result.op_count, result.key_count) == (4, 1)
    assert result.keys[0].steps >= 4


def test_stale_read_is_reported_with_prefix_and_blocked_op(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(1, "write", "k", 2)
    rec.ok(1, 2)
    rec.invoke(2, "read", "k")
    rec.ok(2, 1)  # the write of 2 completed before this read began
    result = check_linearizable(rec.history)
    assert result.valid is False
    [bad] = result.invalid_keys
    cex = bad.counterexample
    assert cex is not None
    assert [x.pair.invoke.value for x in cex.prefix] == [1, 2]
    assert [x.state_after for x in cex.prefix] == [1, 2]
    assert cex.state == 2
    assert cex.op.f == "read" and cex.op.completion is not None and cex.op.completion.value == 1
    assert bad.reason is not None and "index 4" in bad.reason
    json.dumps(result.to_dict())
    assert result.to_dict()["invalid"][0]["counterexample"]["op"]["invoke"]["index"] == 4


def test_concurrent_write_may_be_seen_or_not(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.invoke(1, "read", "k")
    rec.invoke(2, "read", "k")
    rec.ok(1, 1)
    rec.ok(2, None)
    rec.ok(0, 1)
    assert check_linearizable(rec.history).valid is True


def test_reads_going_back_in_time_are_not_linearizable(rec: HistoryRecorder) -> None:
    # The write is concurrent with both reads, but once one read saw 1, a read that
    # began after it completed cannot see the old value.
    rec.invoke(0, "write", "k", 1)
    rec.invoke(1, "read", "k")
    rec.ok(1, 1)
    rec.invoke(1, "read", "k")
    rec.ok(1, None)
    rec.ok(0, 1)
    assert check_linearizable(rec.history).valid is False


def test_info_write_may_take_effect_later_or_never(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.info(0)  # timed out
    rec.invoke(1, "read", "k")
    rec.ok(1, None)  # not yet
    rec.invoke(1, "read", "k")
    rec.ok(1, 1)  # now it took effect
    assert check_linearizable(rec.history).valid is True
    # ...but it takes effect once: the value cannot disappear again.
    rec.invoke(1, "read", "k")
    rec.ok(1, None)
    assert check_linearizable(rec.history).valid is False


def test_info_write_that_never_happens_is_fine(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.info(0)
    rec.invoke(1, "read", "k")
    rec.ok(1, None)
    rec.invoke(2, "write", "k", 2)  # never completes at all
    rec.invoke(1, "read", "k")
    rec.ok(1, None)
    result = check_linearizable(rec.history)
    assert result.valid is True
    assert result.keys[0].pending_count == 2


def test_failed_write_must_not_be_visible(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.fail(0)
    rec.invoke(1, "read", "k")
    rec.ok(1, 1)
    assert check_linearizable(rec.history).valid is False


def test_cas_needs_the_expected_value(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(0, "cas", "k", [2, 3])
    rec.ok(0, [2, 3])  # claims success although the register held 1
    assert check_linearizable(rec.history).valid is False


def test_pending_cas_either_swaps_or_does_nothing(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(1, "cas", "k", [1, 5])
    rec.info(1)
    rec.invoke(2, "read", "k")
    rec.ok(2, 1)
    rec.invoke(2, "read", "k")
    rec.ok(2, 5)
    assert check_linearizable(rec.history).valid is True
    rec.invoke(2, "cas", "k", [7, 8])
    rec.info(2)
    rec.invoke(3, "read", "k")
    rec.ok(3, 8)  # the cas from 7 can never have succeeded
    assert check_linearizable(rec.history).valid is False


def test_non_linearizable_cas_history_from_concurrent_clients(rec: HistoryRecorder) -> None:
    # Two concurrent CAS 0->1 both succeed: impossible on one register.
    rec.invoke(0, "write", "k", 0)
    rec.ok(0, 0)
    rec.invoke(1, "cas", "k", [0, 1])
    rec.invoke(2, "cas", "k", [0, 1])
    rec.ok(1, [0, 1])
    rec.ok(2, [0, 1])
    result = check_linearizable(rec.history)
    assert result.valid is False
    cex = result.invalid_keys[0].counterexample
    assert cex is not None
    assert [x.pair.f for x in cex.prefix] == ["write", "cas"]
    assert cex.op.f == "cas" and cex.state == 1


def test_keys_are_checked_independently(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "a", 1)
    rec.invoke(1, "write", "b", 1)
    rec.ok(0, 1)
    rec.ok(1, 1)
    rec.invoke(0, "read", "a")
    rec.invoke(1, "read", "b")
    rec.ok(0, 1)
    rec.ok(1, None)  # b lost its write
    result = check_linearizable(rec.history, stop_on_first_failure=False)
    assert result.valid is False
    assert [k.key for k in result.invalid_keys] == ["b"]
    assert [(k.key, k.valid) for k in result.keys] == [("a", True), ("b", False)]
    # Reading a value of another key is a violation too (state is per key).
    only_a = check_linearizable(rec.history, keys=["a"])
    assert only_a.valid is True and only_a.key_count == 1


def _hard_history(writers: int = 12) -> list[Op]:
    """All writers overlap, then a read sees a value nobody wrote: the search must try
    every order of the writes before it can say no."""
    r = HistoryRecorder(clock=iter(range(0, 10_000)).__next__)
    for p in range(writers):
        r.invoke(p, "write", "k", p)
    for p in range(writers):
        r.ok(p, p)
    r.invoke(0, "read", "k")
    r.ok(0, 99)
    return r.history


def test_step_budget_gives_unknown_never_true() -> None:
    history = _hard_history()
    result = check_linearizable(history, max_steps=1000, time_limit_s=None)
    assert result.valid == "unknown"
    [key] = result.unknown_keys
    assert key.reason == "step budget of 1000 exceeded"
    assert key.steps == 1000
    # With enough budget the search decides.
    assert check_linearizable(history, max_steps=None, time_limit_s=None).valid is False


def test_time_budget_gives_unknown() -> None:
    result = check_linearizable(_hard_history(), max_steps=None, time_limit_s=0.0)
    assert result.valid == "unknown"
    assert result.unknown_keys[0].reason == "time budget exceeded"
    assert result.to_dict()["unknown_key_count"] == 1


def test_unknown_on_one_key_and_violation_on_another_is_invalid() -> None:
    history = _hard_history(10)
    offset = len(history)
    bad = [
        Op(offset, "invoke", 50, offset, "write", "z", 1),
        Op(offset + 1, "ok", 50, offset + 1, "write", "z", 1),
        Op(offset + 2, "invoke", 50, offset + 2, "read", "z"),
        Op(offset + 3, "ok", 50, offset + 3, "read", "z", 2),
    ]
    result = check_linearizable(history + bad, max_steps=500, stop_on_first_failure=False)
    assert result.valid is False
    assert {k.key: k.valid for k in result.keys} == {"k": "unknown", "z": False}


def test_stop_on_first_failure_leaves_other_keys_undecided() -> None:
    history = _hard_history(11)
    offset = len(history)
    bad = [
        Op(offset, "invoke", 50, offset, "read", "a"),
        Op(offset + 1, "ok", 50, offset + 1, "read", "a", 3),
    ]
    result = check_linearizable(history + bad, max_steps=None, time_limit_s=None)
    assert result.valid is False
    by_key = {k.key: k for k in result.keys}
    assert by_key["a"].valid is False
    assert by_key["k"].valid == "unknown"
    assert by_key["k"].reason is not None and "stopped after key 'a'" in by_key["k"].reason


def test_kv_model_append_put_get(rec: HistoryRecorder) -> None:
    model = KVRegisterModel(initial="")
    rec.invoke(0, "append", "k", "x")
    rec.invoke(1, "append", "k", "y")
    rec.ok(0, "x")
    rec.ok(1, "y")
    rec.invoke(0, "get", "k")
    rec.ok(0, "yx")  # either order of the concurrent appends is fine
    rec.invoke(0, "put", "k", "z")
    rec.ok(0, "z")
    rec.invoke(0, "append", "k", "w")
    rec.ok(0, "w")
    rec.invoke(1, "get", "k")
    rec.ok(1, "zw")
    assert check_linearizable(rec.history, model).valid is True
    rec.invoke(1, "get", "k")
    rec.ok(1, "xyzw")
    assert check_linearizable(rec.history, model).valid is False


def test_kv_model_missing_key_reads_as_initial(rec: HistoryRecorder) -> None:
    rec.invoke(0, "get", "k")
    rec.ok(0, None)
    rec.invoke(0, "put", "k", "a")
    rec.ok(0, "a")
    rec.invoke(0, "delete", "k")
    rec.ok(0)
    rec.invoke(0, "get", "k")
    rec.ok(0, None)
    assert check_linearizable(rec.history, KVRegisterModel()).valid is True


def test_models_reject_unknown_operations(rec: HistoryRecorder) -> None:
    rec.invoke(0, "increment", "k", 1)
    rec.ok(0)
    with pytest.raises(ValueError, match="unsupported operation 'increment'"):
        check_linearizable(rec.history, CASRegisterModel())
    with pytest.raises(ValueError, match="unsupported operation 'increment'"):
        check_linearizable(rec.history, KVRegisterModel())


def test_cas_model_step_semantics() -> None:
    m = CASRegisterModel(initial=0)
    s = m.init()
    assert m.step(s, ("read", None), 0) == (True, 0)
    assert m.step(s, ("read", None), 1)[0] is False
    assert m.step(s, ("read", None), UNKNOWN) == (True, 0)
    assert m.step(s, ("write", 4), None) == (True, 4)
    assert m.step(s, ("cas", (0, 2)), None) == (True, 2)
    assert m.step(s, ("cas", (1, 2)), None)[0] is False
    assert m.step(s, ("cas", (1, 2)), UNKNOWN) == (True, 0)


def test_check_pairs_on_one_key(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(0, "read", "k")
    rec.ok(0, 2)
    result = check_pairs(CASRegisterModel(), pairs(rec.history), key="k")
    assert result.valid is False and result.key == "k" and result.op_count == 2


def test_kv_model_rejects_appending_mismatched_types(rec: HistoryRecorder) -> None:
    rec.invoke(0, "append", "k", 5)
    rec.ok(0, 5)
    with pytest.raises(ValueError, match="append value must be"):
        check_linearizable(rec.history, KVRegisterModel())
    with pytest.raises(ValueError, match="cannot append"):
        KVRegisterModel(initial="").step("abc", ("append", (1,)), None)
