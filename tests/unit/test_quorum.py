"""Unit tests of kvcluster.core.quorum: quorum levels and tallies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core.quorum import Outcome, Tally, parse_quorum, quorum_size
from kvcluster.errors import InvalidArgument, KVError, to_wire

# -- parse_quorum ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 2),
        ("default", 2),
        ("one", 1),
        ("quorum", 2),
        ("all", 3),
        ("ONE", 1),
        (" Quorum ", 2),
        ("All", 3),
        ("DeFaUlT", 2),
        (1, 1),
        (3, 3),
        ("1", 1),
        ("03", 3),
    ],
)
def test_parse_quorum_values_for_n_3(value: int | str | None, expected: int) -> None:
    assert parse_quorum(value, 3, 2, "r") == expected


@pytest.mark.parametrize(("n", "majority"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)])
def test_quorum_is_a_majority(n: int, majority: int) -> None:
    assert quorum_size(n) == majority
    assert parse_quorum("quorum", n, 1) == majority
    assert parse_quorum("all", n, 1) == n


def test_default_is_the_given_default() -> None:
    assert parse_quorum(None, 5, 4) == 4
    assert parse_quorum("default", 5, 1) == 1


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, "w must be between 1 and n=3, got 0"),
        (4, "w must be between 1 and n=3, got 4"),
        (-1, "w must be between 1 and n=3, got -1"),
        ("0", "w must be between 1 and n=3, got 0"),
        ("4", "w must be between 1 and n=3, got 4"),
        ("two", "w must be one of one, quorum, all, default or a number from 1 to 3"),
        ("", "w must be one of"),
        ("1.5", "w must be one of"),
        ("-1", "w must be one of"),
        ("²", "w must be one of"),
        (True, "w must be a number or a quorum level"),
        (1.0, "w must be a number or a quorum level, got float"),
        (b"1", "w must be a number or a quorum level, got bytes"),
    ],
)
def test_parse_quorum_rejects_bad_values_naming_the_field(value: Any, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        parse_quorum(value, 3, 2, "w")
    assert info.value.field == "w"
    assert isinstance(info.value, KVError)
    assert to_wire(info.value)["field"] == "w"


def test_the_field_defaults_to_quorum() -> None:
    with pytest.raises(InvalidArgument, match="quorum must be") as info:
        parse_quorum(9, 3, 2)
    assert info.value.field == "quorum"


def test_bad_configuration_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="n must be a positive int"):
        parse_quorum(1, 0, 1)
    with pytest.raises(ValueError, match="default r must be between 1 and n=3"):
        parse_quorum(1, 3, 4, "r")
    with pytest.raises(ValueError, match="default r must be between 1 and n=3"):
        parse_quorum(None, 3, 0, "r")


# -- Tally -----------------------------------------------------------------------------


def test_won_once_required_acks_arrive() -> None:
    tally = Tally(2, ["a", "b", "c"])
    assert tally.outcome is Outcome.PENDING
    assert tally.ok("a") is Outcome.PENDING
    assert tally.ok("b") is Outcome.WON
    assert (tally.acks, tally.failures) == (2, 0)
    assert tally.acked == {"a", "b"}
    assert tally.waiting == {"c"}


def test_lost_once_required_cannot_be_reached() -> None:
    tally = Tally(2, ["a", "b", "c"])
    assert tally.failed("a") is Outcome.PENDING
    assert tally.failed("b") is Outcome.LOST
    assert tally.failed_nodes == {"a", "b"}
    # A late ack cannot bring it back.
    assert tally.ok("c") is Outcome.LOST
    assert (tally.acks, tally.failures) == (1, 2)


def test_all_is_lost_on_the_first_failure() -> None:
    tally = Tally(3, ["a", "b", "c"])
    tally.ok("a")
    assert tally.failed("b") is Outcome.LOST


def test_one_is_won_on_the_first_ack_despite_failures() -> None:
    tally = Tally(1, ["a", "b", "c"])
    tally.failed("a")
    tally.failed("b")
    assert tally.outcome is Outcome.PENDING
    assert tally.ok("c") is Outcome.WON


def test_a_won_tally_stays_won() -> None:
    tally = Tally(1, ["a", "b"])
    tally.ok("a")
    assert tally.failed("b") is Outcome.WON


def test_each_target_counts_once_and_its_first_answer_wins() -> None:
    tally = Tally(2, ["a", "b", "c"])
    tally.ok("a")
    tally.ok("a")
    assert tally.acks == 1
    assert tally.outcome is Outcome.PENDING
    tally.failed("a")
    assert (tally.acks, tally.failures) == (1, 0)
    tally.failed("b")
    tally.ok("b")
    assert (tally.acks, tally.failures) == (1, 1)
    assert tally.acked == {"a"}
    assert tally.failed_nodes == {"b"}


def test_more_required_than_targets_is_lost_from_the_start() -> None:
    assert Tally(3, ["a", "b"]).outcome is Outcome.LOST
    assert Tally(1, []).outcome is Outcome.LOST


def test_answers_from_non_targets_are_rejected() -> None:
    tally = Tally(1, ["a"])
    with pytest.raises(ValueError, match="'z' is not a target"):
        tally.ok("z")
    with pytest.raises(ValueError, match="'z' is not a target"):
        tally.failed("z")
    assert tally.outcome is Outcome.PENDING


def test_tally_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="required must be a positive int"):
        Tally(0, ["a"])
    with pytest.raises(ValueError, match="targets must be distinct"):
        Tally(1, ["a", "a"])


def test_repr_shows_the_state() -> None:
    tally = Tally(2, ["a", "b", "c"])
    tally.ok("a")
    assert repr(tally) == "Tally(required=2, acks=1, failures=0, targets=3, outcome=PENDING)"


NODES = ("a", "b", "c", "d", "e")


@given(
    st.integers(1, 6),
    st.integers(0, 5),
    st.lists(st.tuples(st.sampled_from(NODES), st.booleans()), max_size=12),
)
def test_tally_matches_a_reference_model(
    required: int, size: int, answers: list[tuple[str, bool]]
) -> None:
    targets = NODES[:size]
    tally = Tally(required, targets)
    first: dict[str, bool] = {}
    decided: Outcome | None = None
    for node, ok in answers:
        if node not in targets:
            continue
        first.setdefault(node, ok)
        outcome = tally.ok(node) if ok else tally.failed(node)
        acks = sum(first.values())
        failures = len(first) - acks
        if acks >= required:
            assert outcome is Outcome.WON
        elif size - failures < required:
            assert outcome is Outcome.LOST
        else:
            assert outcome is Outcome.PENDING
        assert (tally.acks, tally.failures) == (acks, failures)
        if decided is not None:
            assert outcome is decided  # decided outcomes never change
        elif outcome is not Outcome.PENDING:
            decided = outcome
