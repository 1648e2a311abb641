"""Unit tests for kvcluster.core.agreement, driven one message at a time."""

from __future__ import annotations

from typing import Any

import pytest

from kvcluster.core.agreement import (
    Accept,
    Accepted,
    AcceptorReply,
    AcceptorState,
    Ballot,
    Chosen,
    Commit,
    Message,
    Outgoing,
    Phase,
    Prepare,
    Promise,
    Proposal,
    Proposer,
    Reject,
    Retry,
    Stale,
    Step,
    decode_message,
    encode_message,
    first_round,
    handle,
    majority,
    on_accept,
    on_commit,
    on_prepare,
)

VOTERS = ("a", "b", "c")


class Cluster:
    """Acceptor states by node id; delivers requests and returns the replies."""

    def __init__(self, voters: tuple[str, ...] = VOTERS) -> None:
        self.states = {v: AcceptorState() for v in voters}

    def deliver(self, out: Outgoing) -> AcceptorReply | None:
        self.states[out.to], reply = handle(self.states[out.to], out.msg)
        return reply


def to(outgoing: list[Outgoing] | tuple[Outgoing, ...], node: str) -> Outgoing:
    (out,) = [o for o in outgoing if o.to == node]
    return out


def reply_of(cluster: Cluster, outgoing: list[Outgoing] | tuple[Outgoing, ...], node: str) -> Any:
    reply = cluster.deliver(to(outgoing, node))
    assert reply is not None
    return reply


def phase(p: Proposer) -> Phase:
    """The proposer's phase (a call, so mypy does not narrow it across steps)."""
    return p.phase


# -- helpers -------------------------------------------------------------------


def test_majority() -> None:
    assert [majority(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError):
        majority(0)


def test_ballots_order_by_round_then_node() -> None:
    assert Ballot(1, "z") < Ballot(2, "a")
    assert Ballot(2, "a") < Ballot(2, "b")
    assert Ballot(3, "x") == Ballot(3, "x")


# -- acceptor ------------------------------------------------------------------


def test_fresh_acceptor_promises_and_reports_nothing_accepted() -> None:
    state, reply = on_prepare(AcceptorState(), 1, Ballot(1, "p"))
    assert reply == Promise(1, Ballot(1, "p"), None)
    assert state == AcceptorState(1, Ballot(1, "p"), None)


def test_acceptor_rejects_lower_ballot_and_names_its_promise() -> None:
    state, _ = on_prepare(AcceptorState(), 1, Ballot(5, "q"))
    new, reply = on_prepare(state, 1, Ballot(4, "z"))
    assert new is state
    assert reply == Reject(1, Ballot(4, "z"), committed_epoch=0, promised=Ballot(5, "q"))
    assert isinstance(reply, Reject) and not reply.stale
    new, reply2 = on_accept(state, 1, Ballot(5, "p"), b"v")
    assert new is state
    assert isinstance(reply2, Reject)
    assert reply2.promised == Ballot(5, "q")


def test_duplicate_prepare_is_promised_again_without_a_state_change() -> None:
    state, _ = on_prepare(AcceptorState(), 1, Ballot(2, "p"))
    again, reply = on_prepare(state, 1, Ballot(2, "p"))
    assert again is state
    assert reply == Promise(1, Ballot(2, "p"), None)


def test_promise_reports_the_accepted_proposal() -> None:
    state, _ = on_accept(AcceptorState(), 1, Ballot(1, "p"), b"one")
    assert state.accepted == Proposal(Ballot(1, "p"), b"one")
    assert state.promised == Ballot(1, "p")
    state, reply = on_prepare(state, 1, Ballot(2, "q"))
    assert reply == Promise(1, Ballot(2, "q"), Proposal(Ballot(1, "p"), b"one"))
    assert state.accepted == Proposal(Ballot(1, "p"), b"one")


def test_accept_at_promised_ballot_and_duplicate_accept_is_idempotent() -> None:
    state, _ = on_prepare(AcceptorState(), 1, Ballot(3, "p"))
    state, reply = on_accept(state, 1, Ballot(3, "p"), b"v")
    assert reply == Accepted(1, Ballot(3, "p"))
    again, reply = on_accept(state, 1, Ballot(3, "p"), b"v")
    assert again is state
    assert reply == Accepted(1, Ballot(3, "p"))


def test_decided_epoch_is_rejected_as_stale() -> None:
    state = on_commit(AcceptorState(), 1)
    assert state == AcceptorState(2)
    assert state.committed_epoch == 1
    for reply in (
        on_prepare(state, 1, Ballot(9, "p"))[1],
        on_accept(state, 1, Ballot(9, "p"), b"")[1],
    ):
        assert reply == Reject(1, Ballot(9, "p"), committed_epoch=1, promised=None)
        assert isinstance(reply, Reject) and reply.stale


def test_commit_opens_next_instance_and_old_commits_change_nothing() -> None:
    state, _ = on_accept(AcceptorState(), 1, Ballot(1, "p"), b"v")
    state = on_commit(state, 1)
    assert state == AcceptorState(2)
    assert on_commit(state, 1) is state
    assert on_commit(state, 5) == AcceptorState(6)


def test_acceptor_skips_ahead_to_a_later_epoch() -> None:
    # It missed the commits of epochs 1 and 2; a proposal for 3 implies both.
    state, _ = on_accept(AcceptorState(), 1, Ballot(7, "p"), b"old")
    state, reply = on_prepare(state, 3, Ballot(1, "q"))
    assert reply == Promise(3, Ballot(1, "q"), None)  # nothing from epoch 1 leaks into 3
    assert state == AcceptorState(3, Ballot(1, "q"), None)
    assert state.committed_epoch == 2
    _, reply = on_prepare(state, 1, Ballot(99, "p"))
    assert isinstance(reply, Reject) and reply.stale


def test_accept_without_prepare_skips_ahead_too() -> None:
    state, reply = on_accept(AcceptorState(), 2, Ballot(1, "p"), b"v")
    assert reply == Accepted(2, Ballot(1, "p"))
    assert state == AcceptorState(2, Ballot(1, "p"), Proposal(Ballot(1, "p"), b"v"))


def test_handle_dispatches() -> None:
    state, reply = handle(AcceptorState(), Prepare(1, Ballot(1, "p")))
    assert isinstance(reply, Promise)
    state, reply = handle(state, Accept(1, Ballot(1, "p"), b"v"))
    assert isinstance(reply, Accepted)
    state, reply = handle(state, Commit(1, b"v"))
    assert reply is None
    assert state == AcceptorState(2)


def test_acceptor_state_rejects_epoch_zero() -> None:
    with pytest.raises(ValueError):
        AcceptorState(0)


def test_first_round_outbids_own_acceptor() -> None:
    state, _ = on_prepare(AcceptorState(), 1, Ballot(4, "other"))
    assert first_round(state, 1) == 5
    assert first_round(state, 1, at_least=9) == 9
    assert first_round(state, 2) == 1  # a different instance: nothing promised there


# -- proposer ------------------------------------------------------------------


def run_to_completion(cluster: Cluster, proposer: Proposer) -> Step:
    """Deliver every message in order with no loss; return the final step."""
    queue = list(proposer.start())
    last = Step()
    while queue:
        out = queue.pop(0)
        reply = cluster.deliver(out)
        if reply is None:
            continue
        step = proposer.on_message(out.to, reply)
        queue.extend(step.outgoing)
        if step.outcome is not None:
            last = step
    return last


def test_happy_path() -> None:
    cluster = Cluster()
    p = Proposer("a", 1, b"ring-1", VOTERS)
    prepares = p.start()
    assert prepares == [Outgoing(v, Prepare(1, Ballot(1, "a"))) for v in VOTERS]
    assert phase(p) is Phase.PREPARE

    assert p.on_promise("a", reply_of(cluster, prepares, "a")) == Step()
    step = p.on_promise("b", reply_of(cluster, prepares, "b"))
    assert step.outgoing == tuple(Outgoing(v, Accept(1, Ballot(1, "a"), b"ring-1")) for v in VOTERS)
    assert step.outcome is None
    assert phase(p) is Phase.ACCEPT
    # The late third promise changes nothing.
    assert p.on_promise("c", reply_of(cluster, prepares, "c")) == Step()

    accepts = step.outgoing
    assert p.on_accepted("c", reply_of(cluster, accepts, "c")) == Step()
    step = p.on_accepted("a", reply_of(cluster, accepts, "a"))
    assert step.outcome == Chosen(1, b"ring-1")
    assert step.outgoing == tuple(Outgoing(v, Commit(1, b"ring-1")) for v in VOTERS)
    assert phase(p) is Phase.DONE and p.outcome == Chosen(1, b"ring-1")
    assert p.on_accepted("b", reply_of(cluster, accepts, "b")) == Step()

    for out in step.outgoing:
        cluster.deliver(out)
    assert all(s == AcceptorState(2) for s in cluster.states.values())


def test_single_voter_chooses_alone() -> None:
    cluster = Cluster(("solo",))
    p = Proposer("solo", 1, b"v", ("solo",))
    assert run_to_completion(cluster, p).outcome == Chosen(1, b"v")


def test_competing_proposer_adopts_the_accepted_value() -> None:
    cluster = Cluster()
    # P1 gets its value accepted by a and b only (chosen, but P1 never learns it).
    p1 = Proposer("p1", 1, b"first", VOTERS, round=1)
    prepares = p1.start()
    p1.on_promise("a", reply_of(cluster, prepares, "a"))
    accepts = p1.on_promise("b", reply_of(cluster, prepares, "b")).outgoing
    reply_of(cluster, accepts, "a")
    reply_of(cluster, accepts, "b")

    # P2 with a higher ballot and a different value reaches b and c.
    p2 = Proposer("p2", 1, b"second", VOTERS, round=2)
    prepares2 = p2.start()
    promise_c = reply_of(cluster, prepares2, "c")
    assert promise_c.accepted is None
    p2.on_promise("c", promise_c)
    promise_b = reply_of(cluster, prepares2, "b")
    assert promise_b.accepted == Proposal(Ballot(1, "p1"), b"first")
    step = p2.on_promise("b", promise_b)
    assert p2.value == b"first" and p2.proposed == b"second"
    assert {out.msg for out in step.outgoing} == {Accept(1, Ballot(2, "p2"), b"first")}
    p2.on_accepted("b", reply_of(cluster, step.outgoing, "b"))
    done = p2.on_accepted("c", reply_of(cluster, step.outgoing, "c"))
    assert done.outcome == Chosen(1, b"first")


def test_highest_ballot_accepted_value_wins() -> None:
    p = Proposer("p", 1, b"mine", VOTERS, round=9)
    p.start()
    ballot = p.ballot
    p.on_promise("a", Promise(1, ballot, Proposal(Ballot(3, "x"), b"newer")))
    p.on_promise("b", Promise(1, ballot, Proposal(Ballot(2, "y"), b"older")))
    assert p.value == b"newer"
    p2 = Proposer("p", 1, b"mine", VOTERS, round=9)
    p2.start()
    p2.on_promise("a", Promise(1, ballot, Proposal(Ballot(2, "y"), b"older")))
    p2.on_promise("b", Promise(1, ballot, Proposal(Ballot(3, "x"), b"newer")))
    assert p2.value == b"newer"


def test_minority_cannot_choose() -> None:
    cluster = Cluster()
    p = Proposer("a", 1, b"v", VOTERS)
    prepares = p.start()
    # Only "a" is reachable: any number of its answers gives no quorum.
    for _ in range(3):
        assert p.on_promise("a", reply_of(cluster, prepares, "a")) == Step()
    assert phase(p) is Phase.PREPARE
    assert p.retransmit() == [o for o in prepares if o.to != "a"]


def test_one_accepted_of_three_is_not_chosen() -> None:
    cluster = Cluster()
    p = Proposer("a", 1, b"v", VOTERS)
    prepares = p.start()
    p.on_promise("a", reply_of(cluster, prepares, "a"))
    accepts = p.on_promise("b", reply_of(cluster, prepares, "b")).outgoing
    # Then b and c become unreachable: only a's Accepted arrives, repeatedly.
    for _ in range(3):
        assert p.on_accepted("a", reply_of(cluster, accepts, "a")) == Step()
    assert phase(p) is Phase.ACCEPT and p.outcome is None


def test_stale_proposer_learns_it_is_behind() -> None:
    cluster = Cluster()
    run_to_completion(cluster, Proposer("a", 1, b"v1", VOTERS))
    run_to_completion(cluster, Proposer("a", 2, b"v2", VOTERS))
    old = Proposer("b", 2, b"late", VOTERS, round=50)
    prepares = old.start()
    reply = reply_of(cluster, prepares, "c")
    assert isinstance(reply, Reject) and reply.stale
    step = old.on_reject("c", reply)
    assert step.outcome == Stale(2)
    assert phase(old) is Phase.DONE
    assert old.retransmit() == []


def test_duplicate_promise_counts_once() -> None:
    cluster = Cluster(("a", "b", "c", "d", "e"))
    p = Proposer("a", 1, b"v", tuple(cluster.states))
    prepares = p.start()
    promise = reply_of(cluster, prepares, "a")
    for _ in range(5):
        assert p.on_promise("a", promise) == Step()
    assert p.on_promise("b", reply_of(cluster, prepares, "b")) == Step()
    assert phase(p) is Phase.PREPARE
    step = p.on_promise("c", reply_of(cluster, prepares, "c"))
    assert phase(p) is Phase.ACCEPT and len(step.outgoing) == 5


def test_duplicate_accepted_counts_once() -> None:
    p = Proposer("a", 1, b"v", VOTERS)
    p.start()
    p.on_promise("a", Promise(1, p.ballot, None))
    p.on_promise("b", Promise(1, p.ballot, None))
    for _ in range(3):
        assert p.on_accepted("c", Accepted(1, p.ballot)) == Step()
    assert p.on_accepted("a", Accepted(1, p.ballot)).outcome == Chosen(1, b"v")


def test_replies_for_other_ballots_epochs_or_from_strangers_are_ignored() -> None:
    p = Proposer("a", 2, b"v", VOTERS, round=3)
    p.start()
    ignored: list[tuple[str, AcceptorReply]] = [
        ("a", Promise(2, Ballot(2, "a"), None)),  # an earlier attempt
        ("a", Promise(1, Ballot(3, "a"), None)),  # another epoch
        ("zz", Promise(2, Ballot(3, "a"), None)),  # not a voter
        ("b", Reject(2, Ballot(2, "a"), 1, Ballot(9, "q"))),  # earlier attempt's reject
        ("b", Reject(1, Ballot(3, "a"), 5, None)),  # other epoch, even if stale
        ("c", Accepted(2, Ballot(3, "a"))),  # phase 2 has not started
    ]
    for sender, msg in ignored:
        assert p.on_message(sender, msg) == Step()
    assert phase(p) is Phase.PREPARE and p.outcome is None
    # None of them counted: it still takes two promises for this ballot.
    assert p.on_promise("c", Promise(2, p.ballot, None)) == Step()
    assert len(p.on_promise("b", Promise(2, p.ballot, None)).outgoing) == 3


def test_messages_before_start_are_ignored() -> None:
    p = Proposer("a", 1, b"v", VOTERS)
    assert p.on_promise("a", Promise(1, p.ballot, None)) == Step()
    assert p.retransmit() == []
    p.start()
    with pytest.raises(RuntimeError):
        p.start()


def test_one_reject_does_not_end_the_attempt_but_a_lost_majority_does() -> None:
    p = Proposer("a", 1, b"v", VOTERS, round=2)
    p.start()
    assert p.on_reject("a", Reject(1, p.ballot, 0, Ballot(7, "x"))) == Step()
    assert p.on_promise("b", Promise(1, p.ballot, None)) == Step()
    step = p.on_reject("c", Reject(1, p.ballot, 0, Ballot(4, "y")))
    assert step == Step((), Retry(8))
    assert p.on_promise("c", Promise(1, p.ballot, None)) == Step()


def test_rejects_in_phase_two_lead_to_retry() -> None:
    cluster = Cluster()
    p1 = Proposer("p1", 1, b"one", VOTERS, round=1)
    prepares = p1.start()
    p1.on_promise("a", reply_of(cluster, prepares, "a"))
    accepts = p1.on_promise("b", reply_of(cluster, prepares, "b")).outgoing
    # A higher ballot gets promised by b and c before p1's Accepts arrive.
    p2 = Proposer("p2", 1, b"two", VOTERS, round=3)
    prepares2 = p2.start()
    p2.on_promise("b", reply_of(cluster, prepares2, "b"))
    p2.on_promise("c", reply_of(cluster, prepares2, "c"))
    assert p1.on_message("b", reply_of(cluster, accepts, "b")) == Step()
    step = p1.on_message("c", reply_of(cluster, accepts, "c"))
    assert step.outcome == Retry(4)
    # "a" still accepts p1's ballot, but the attempt is over.
    assert p1.on_accepted("a", reply_of(cluster, accepts, "a")) == Step()


def test_retransmit_targets_voters_that_have_not_answered() -> None:
    p = Proposer("a", 1, b"v", VOTERS)
    p.start()
    p.on_promise("a", Promise(1, p.ballot, None))
    assert [o.to for o in p.retransmit()] == ["b", "c"]
    p.on_promise("c", Promise(1, p.ballot, None))
    p.on_accepted("c", Accepted(1, p.ballot))
    assert p.retransmit() == [Outgoing(v, Accept(1, p.ballot, b"v")) for v in ("a", "b")]
    p.on_accepted("a", Accepted(1, p.ballot))
    assert p.retransmit() == [Outgoing(v, Commit(1, b"v")) for v in VOTERS]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voters": ()}, "at least one voter"),
        ({"voters": ("a", "a")}, "duplicate"),
        ({"epoch": 0}, "epoch"),
        ({"round": 0}, "round"),
    ],
)
def test_proposer_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"node_id": "a", "epoch": 1, "value": b"v", "voters": VOTERS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Proposer(**args)


# -- encoding ------------------------------------------------------------------

MESSAGES: list[Message] = [
    Prepare(1, Ballot(1, "a")),
    Promise(2, Ballot(3, "b"), None),
    Promise(2, Ballot(3, "b"), Proposal(Ballot(2, "c"), b"\x00ring")),
    Accept(4, Ballot(5, "n\u00f6de"), b""),
    Accepted(4, Ballot(5, "d")),
    Reject(3, Ballot(1, "a"), 2, None),
    Reject(3, Ballot(1, "a"), 0, Ballot(9, "z")),
    Commit(7, b"ring-7"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


@pytest.mark.parametrize(
    "state",
    [
        AcceptorState(),
        AcceptorState(3, Ballot(2, "a"), None),
        AcceptorState(5, Ballot(4, "b"), Proposal(Ballot(4, "b"), b"v")),
    ],
)
def test_state_round_trip(state: AcceptorState) -> None:
    assert AcceptorState.decode(state.encode()) == state


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        encode_message(Prepare(1, Ballot(1, "a")))[:-1],
        b"\x93\x09\x01\x02",  # unknown kind 9
        b"\x93\x01\x00\x92\x01\xa1a",  # Prepare for epoch 0
        b"\x93\x01\xc3\x92\x01\xa1a",  # epoch is a bool
        b"\x93\x01\x01\x92\x01\x01",  # ballot node id is not a string
        b"\x92\x06\x01",  # Commit missing its value
        b"\x93\x06\x01\xa1v",  # Commit value is a str, not bytes
    ],
)
def test_malformed_messages_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_message(raw)


def test_malformed_state_raises_value_error() -> None:
    with pytest.raises(ValueError):
        AcceptorState.decode(b"\x94\x02\x01\xc0\xc0")  # unknown version
    with pytest.raises(ValueError):
        AcceptorState.decode(b"\x94\x01\x00\xc0\xc0")  # epoch 0
