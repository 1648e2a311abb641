"""Agreement on cluster metadata: one single-decree Paxos instance per epoch.

Cluster metadata (the ring) is versioned by an epoch. Version ``e`` is chosen
by Paxos instance ``e`` whose *voters* (acceptors) are the members of version
``e - 1``; for ``e == 1`` they are the configured seed members. A value needs
the acceptance of a majority of those voters, so the minority side of a
partition can never change the ring (DESIGN.md §3). Values are opaque
``bytes``: the caller serialises the ring and only equality matters here.

Everything here is pure, in the style of etcd-io/raft: the acceptor is a set
of functions from (state, message) to (new state, reply), the proposer is a
state machine fed one message at a time that returns the messages to send.
The network, timers and disk belong to the caller.

Caller obligations
------------------
* **Persist before replying.** Whenever an acceptor function returns a state
  different from the one it was given, the caller must write it durably
  (:meth:`AcceptorState.encode`) before sending the reply.
* **Unique ballots.** A ballot is ``(round, node_id)``; node ids are distinct
  and a node must never start two attempts with the same round for the same
  epoch, not even across restarts. The simplest rule: a node proposing for an
  epoch uses a round above both its previous attempts and the round its own
  acceptor has promised (:func:`first_round`), and persists that acceptor's
  state (e.g. by delivering the Prepare to itself first) before sending
  anything to others.
* **Timers.** The proposer never times out by itself. When an attempt makes no
  progress the caller may :meth:`Proposer.retransmit`, or abandon it and start
  a new :class:`Proposer` with a higher round after a randomised backoff.
* **Learning.** :class:`Commit` messages go to the voters when a value is
  chosen; the caller should also tell other nodes (e.g. members that are new
  in the chosen version). A learner applies ``Commit(e, v)`` when ``e`` is
  above its local metadata epoch. ``Chosen`` may carry a value other than the
  one proposed (Paxos must finish an earlier proposer's value); the caller then
  re-bases its change on the new version and proposes again at ``e + 1``.
  ``Stale`` means the epoch is already decided elsewhere: fetch the newer
  metadata (from the node that replied, say) and retry from there.

Why an acceptor may skip ahead: a Prepare or Accept for an epoch ``f`` above
its open instance implies ``f - 1`` was decided (the proposer holds version
``f - 1``). Leaving an instance only means never answering for it again,
which Paxos always allows, so the acceptor drops its state for the old
instance and votes in ``f``. A node that missed a Commit therefore does not
stall the next change.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

__all__ = [
    "Accept",
    "Accepted",
    "AcceptorReply",
    "AcceptorRequest",
    "AcceptorState",
    "Ballot",
    "Chosen",
    "Commit",
    "Message",
    "Outcome",
    "Outgoing",
    "Phase",
    "Prepare",
    "Promise",
    "Proposal",
    "Proposer",
    "Reject",
    "Retry",
    "Stale",
    "Step",
    "decode_message",
    "encode_message",
    "first_round",
    "handle",
    "majority",
    "on_accept",
    "on_commit",
    "on_prepare",
]


def majority(n: int) -> int:
    """The smallest number of voters out of ``n`` that forms a majority."""
    if n < 1:
        raise ValueError(f"need at least one voter, got {n}")
    return n // 2 + 1


@dataclass(frozen=True, slots=True, order=True)
class Ballot:
    """A proposal number, ordered by ``round`` and then ``node_id``."""

    round: int
    node_id: str


@dataclass(frozen=True, slots=True)
class Proposal:
    """A value an acceptor accepted, with the ballot it was accepted under."""

    ballot: Ballot
    value: bytes


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a: proposer asks a voter to promise ``ballot`` for ``epoch``."""

    epoch: int
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b: the voter promised ``ballot``; ``accepted`` is its last vote."""

    epoch: int
    ballot: Ballot
    accepted: Proposal | None


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a: proposer asks a voter to accept ``value`` under ``ballot``."""

    epoch: int
    ballot: Ballot
    value: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase 2b: the voter accepted the proposal ``(epoch, ballot)``."""

    epoch: int
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Reject:
    """A voter refused a Prepare or Accept (``epoch`` and ``ballot`` echo it).

    ``committed_epoch`` is the highest epoch the voter knows to be decided:
    when it is at least ``epoch`` the proposer is stale. Otherwise ``promised``
    is the higher ballot the voter promised, so the proposer can outbid it.
    """

    epoch: int
    ballot: Ballot
    committed_epoch: int
    promised: Ballot | None

    @property
    def stale(self) -> bool:
        return self.committed_epoch >= self.epoch


@dataclass(frozen=True, slots=True)
class Commit:
    """``value`` was chosen for ``epoch``: learners apply it."""

    epoch: int
    value: bytes


AcceptorRequest: TypeAlias = Prepare | Accept | Commit
AcceptorReply: TypeAlias = Promise | Accepted | Reject
Message: TypeAlias = AcceptorRequest | AcceptorReply


# -- acceptor ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AcceptorState:
    """What a voter must keep durably.

    ``epoch`` is the open instance this voter votes in; every lower epoch is
    known to be decided (:attr:`committed_epoch`), though the caller may not
    have its value yet. ``promised`` and ``accepted`` belong to ``epoch``.
    """

    epoch: int = 1
    promised: Ballot | None = None
    accepted: Proposal | None = None

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ValueError(f"epoch must be at least 1, got {self.epoch}")

    @property
    def committed_epoch(self) -> int:
        """The highest epoch known to be decided (0 before the first)."""
        return self.epoch - 1

    def encode(self) -> bytes:
        return _pack(
            (_STATE_VERSION, self.epoch, _enc_ballot(self.promised), _enc_proposal(self.accepted))
        )

    @staticmethod
    def decode(raw: bytes) -> AcceptorState:
        items = _unpack(raw, "AcceptorState")
        _expect_len(items, 4, "AcceptorState")
        if items[0] != _STATE_VERSION:
            raise ValueError(f"unknown AcceptorState version {items[0]!r}")
        return AcceptorState(
            _epoch(items[1]), _dec_ballot_opt(items[2]), _dec_proposal_opt(items[3])
        )


def _enter(state: AcceptorState, epoch: int) -> AcceptorState:
    """The state for voting in ``epoch`` (> committed): skip ahead if needed."""
    return state if epoch == state.epoch else AcceptorState(epoch)


def _refuse(state: AcceptorState, epoch: int, ballot: Ballot) -> Reject | None:
    if epoch <= state.committed_epoch:
        return Reject(epoch, ballot, state.committed_epoch, None)
    if epoch == state.epoch and state.promised is not None and ballot < state.promised:
        return Reject(epoch, ballot, state.committed_epoch, state.promised)
    return None


def on_prepare(
    state: AcceptorState, epoch: int, ballot: Ballot
) -> tuple[AcceptorState, Promise | Reject]:
    """Phase 1b. Promise ``ballot`` unless a higher one was promised or ``epoch`` is decided.

    Re-promising the ballot already promised is allowed (a duplicate Prepare).
    """
    reject = _refuse(state, epoch, ballot)
    if reject is not None:
        return state, reject
    entered = _enter(state, epoch)
    new = AcceptorState(epoch, ballot, entered.accepted)
    return (state if new == state else new), Promise(epoch, ballot, entered.accepted)


def on_accept(
    state: AcceptorState, epoch: int, ballot: Ballot, value: bytes
) -> tuple[AcceptorState, Accepted | Reject]:
    """Phase 2b. Accept unless a higher ballot was promised or ``epoch`` is decided."""
    reject = _refuse(state, epoch, ballot)
    if reject is not None:
        return state, reject
    new = AcceptorState(epoch, ballot, Proposal(ballot, value))
    return (state if new == state else new), Accepted(epoch, ballot)


def on_commit(state: AcceptorState, epoch: int) -> AcceptorState:
    """``epoch`` was decided: open the next instance (old news changes nothing)."""
    if epoch < state.epoch:
        return state
    return AcceptorState(epoch + 1)


def handle(
    state: AcceptorState, msg: AcceptorRequest
) -> tuple[AcceptorState, AcceptorReply | None]:
    """Dispatch one request to the acceptor; a Commit has no reply."""
    if isinstance(msg, Prepare):
        return on_prepare(state, msg.epoch, msg.ballot)
    if isinstance(msg, Accept):
        return on_accept(state, msg.epoch, msg.ballot, msg.value)
    return on_commit(state, msg.epoch), None


def first_round(state: AcceptorState, epoch: int, at_least: int = 1) -> int:
    """A round for this node's next attempt at ``epoch`` that outbids its own acceptor.

    ``state`` is the local acceptor's state; ``at_least`` is the lowest round
    the caller may use (one above its last attempt, or a ``Retry.next_round``).
    """
    if state.epoch == epoch and state.promised is not None:
        return max(at_least, state.promised.round + 1)
    return at_least


# -- proposer ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Send ``msg`` to node ``to``."""

    to: str
    msg: Prepare | Accept | Commit


@dataclass(frozen=True, slots=True)
class Chosen:
    """``value`` is chosen for ``epoch``; it may differ from the value proposed."""

    epoch: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Retry:
    """Preempted by a higher ballot: try again (after a backoff) with ``next_round``."""

    next_round: int


@dataclass(frozen=True, slots=True)
class Stale:
    """The epoch is already decided; some voter knows epochs up to ``committed_epoch``."""

    committed_epoch: int


Outcome: TypeAlias = Chosen | Retry | Stale


@dataclass(frozen=True, slots=True)
class Step:
    """What the proposer wants after one event: messages to send, maybe an outcome."""

    outgoing: tuple[Outgoing, ...] = ()
    outcome: Outcome | None = None


_NOTHING = Step()


class Phase(enum.Enum):
    NEW = "new"
    PREPARE = "prepare"
    ACCEPT = "accept"
    DONE = "done"


class Proposer:
    """One attempt to get ``value`` chosen for ``epoch`` among ``voters`` with one ballot.

    Feed it every reply addressed to it; replies for other epochs or ballots,
    from non-voters, duplicates and anything after the outcome are ignored.
    """

    def __init__(
        self, node_id: str, epoch: int, value: bytes, voters: Sequence[str], round: int = 1
    ) -> None:
        if epoch < 1:
            raise ValueError(f"epoch must be at least 1, got {epoch}")
        if round < 1:
            raise ValueError(f"round must be at least 1, got {round}")
        if len(set(voters)) != len(voters):
            raise ValueError(f"duplicate voters in {voters!r}")
        self._voters = tuple(voters)
        self._quorum = majority(len(self._voters))
        self._epoch = epoch
        self._ballot = Ballot(round, node_id)
        self._proposed = value
        self._value = value
        self._phase = Phase.NEW
        self._promised: set[str] = set()
        self._highest: Proposal | None = None
        self._accepted: set[str] = set()
        self._rejected: set[str] = set()
        self._top_round = round
        self._outcome: Outcome | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def ballot(self) -> Ballot:
        return self._ballot

    @property
    def voters(self) -> tuple[str, ...]:
        return self._voters

    @property
    def proposed(self) -> bytes:
        """The value this attempt was started with."""
        return self._proposed

    @property
    def value(self) -> bytes:
        """The value phase 2 uses (or will use, if no earlier value turns up)."""
        return self._value

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def start(self) -> list[Outgoing]:
        """Begin phase 1: a Prepare to every voter. Call once."""
        if self._phase is not Phase.NEW:
            raise RuntimeError("proposer already started")
        self._phase = Phase.PREPARE
        return self._to(self._voters, Prepare(self._epoch, self._ballot))

    def retransmit(self) -> list[Outgoing]:
        """The current phase's request again, to every voter that has not answered it.

        After a Chosen outcome, the Commit to every voter; otherwise nothing.
        """
        if self._phase is Phase.PREPARE:
            answered = self._promised | self._rejected
            return self._to(self._missing(answered), Prepare(self._epoch, self._ballot))
        if self._phase is Phase.ACCEPT:
            answered = self._accepted | self._rejected
            msg = Accept(self._epoch, self._ballot, self._value)
            return self._to(self._missing(answered), msg)
        if isinstance(self._outcome, Chosen):
            return self._to(self._voters, Commit(self._epoch, self._value))
        return []

    def on_promise(self, sender: str, msg: Promise) -> Step:
        if self._phase is not Phase.PREPARE or not self._ours(sender, msg.epoch, msg.ballot):
            return _NOTHING
        if sender in self._promised:
            return _NOTHING
        self._promised.add(sender)
        if msg.accepted is not None and (
            self._highest is None or msg.accepted.ballot > self._highest.ballot
        ):
            self._highest = msg.accepted
        if len(self._promised) < self._quorum:
            return _NOTHING
        if self._highest is not None:
            self._value = self._highest.value
        self._phase = Phase.ACCEPT
        accept = Accept(self._epoch, self._ballot, self._value)
        return Step(tuple(self._to(self._voters, accept)))

    def on_accepted(self, sender: str, msg: Accepted) -> Step:
        if self._phase is not Phase.ACCEPT or not self._ours(sender, msg.epoch, msg.ballot):
            return _NOTHING
        if sender in self._accepted:
            return _NOTHING
        self._accepted.add(sender)
        if len(self._accepted) < self._quorum:
            return _NOTHING
        commit = Commit(self._epoch, self._value)
        return self._finish(Chosen(self._epoch, self._value), self._to(self._voters, commit))

    def on_reject(self, sender: str, msg: Reject) -> Step:
        if self._phase not in (Phase.PREPARE, Phase.ACCEPT):
            return _NOTHING
        if not self._ours(sender, msg.epoch, msg.ballot):
            return _NOTHING
        if msg.stale:
            return self._finish(Stale(msg.committed_epoch))
        self._rejected.add(sender)
        if msg.promised is not None:
            self._top_round = max(self._top_round, msg.promised.round)
        # A voter that refused this ballot never accepts it later, so give up
        # only once a majority can no longer be reached.
        granted = self._promised if self._phase is Phase.PREPARE else self._accepted
        possible = granted | (set(self._voters) - self._rejected)
        if len(possible) >= self._quorum:
            return _NOTHING
        return self._finish(Retry(self._top_round + 1))

    def on_message(self, sender: str, msg: AcceptorReply) -> Step:
        if isinstance(msg, Promise):
            return self.on_promise(sender, msg)
        if isinstance(msg, Accepted):
            return self.on_accepted(sender, msg)
        return self.on_reject(sender, msg)

    def _ours(self, sender: str, epoch: int, ballot: Ballot) -> bool:
        return epoch == self._epoch and ballot == self._ballot and sender in self._voters

    def _missing(self, answered: set[str]) -> list[str]:
        return [v for v in self._voters if v not in answered]

    def _finish(self, outcome: Outcome, outgoing: Sequence[Outgoing] = ()) -> Step:
        self._phase = Phase.DONE
        self._outcome = outcome
        return Step(tuple(outgoing), outcome)

    @staticmethod
    def _to(nodes: Sequence[str], msg: Prepare | Accept | Commit) -> list[Outgoing]:
        return [Outgoing(node, msg) for node in nodes]

    def __repr__(self) -> str:
        return (
            f"Proposer(epoch={self._epoch}, ballot={self._ballot}, phase={self._phase.value},"
            f" voters={self._voters}, outcome={self._outcome})"
        )


# -- encoding ------------------------------------------------------------------
#
# Self-contained msgpack encoding, so the node can carry these messages in the
# opaque ``Agreement`` envelope and store AcceptorState in META without
# registering codec tags. Decoding checks every field: the input comes from
# the network or disk.

_STATE_VERSION = 1

_KIND: dict[type[Any], int] = {
    Prepare: 1,
    Promise: 2,
    Accept: 3,
    Accepted: 4,
    Reject: 5,
    Commit: 6,
}


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _unpack(raw: bytes, what: str) -> tuple[Any, ...]:
    try:
        items = msgpack.unpackb(raw, use_list=False, raw=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"malformed {what}: {exc}") from exc
    if not isinstance(items, tuple) or not items:
        raise ValueError(f"malformed {what}: expected a non-empty array")
    return items


def _expect_len(items: tuple[Any, ...], n: int, what: str) -> None:
    if len(items) != n:
        raise ValueError(f"malformed {what}: {len(items)} fields, expected {n}")


def _int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise ValueError(f"expected an integer, got {x!r}")
    return x


def _epoch(x: Any, minimum: int = 1) -> int:
    n = _int(x)
    if n < minimum:
        raise ValueError(f"epoch {n} below {minimum}")
    return n


def _bytes(x: Any) -> bytes:
    if not isinstance(x, bytes):
        raise ValueError(f"expected bytes, got {type(x).__name__}")
    return x


def _enc_ballot(b: Ballot | None) -> tuple[int, str] | None:
    return None if b is None else (b.round, b.node_id)


def _dec_ballot(x: Any) -> Ballot:
    if not isinstance(x, tuple) or len(x) != 2 or not isinstance(x[1], str):
        raise ValueError(f"malformed ballot {x!r}")
    return Ballot(_int(x[0]), x[1])


def _dec_ballot_opt(x: Any) -> Ballot | None:
    return None if x is None else _dec_ballot(x)


def _enc_proposal(p: Proposal | None) -> tuple[tuple[int, str] | None, bytes] | None:
    return None if p is None else (_enc_ballot(p.ballot), p.value)


def _dec_proposal_opt(x: Any) -> Proposal | None:
    if x is None:
        return None
    if not isinstance(x, tuple) or len(x) != 2:
        raise ValueError(f"malformed accepted proposal {x!r}")
    return Proposal(_dec_ballot(x[0]), _bytes(x[1]))


def encode_message(msg: Message) -> bytes:
    """Encode one agreement message to bytes (see :func:`decode_message`)."""
    kind = _KIND[type(msg)]
    if isinstance(msg, Prepare | Accepted):
        fields: tuple[Any, ...] = (msg.epoch, _enc_ballot(msg.ballot))
    elif isinstance(msg, Promise):
        fields = (msg.epoch, _enc_ballot(msg.ballot), _enc_proposal(msg.accepted))
    elif isinstance(msg, Accept):
        fields = (msg.epoch, _enc_ballot(msg.ballot), msg.value)
    elif isinstance(msg, Reject):
        fields = (
            msg.epoch,
            _enc_ballot(msg.ballot),
            msg.committed_epoch,
            _enc_ballot(msg.promised),
        )
    else:
        fields = (msg.epoch, msg.value)
    return _pack((kind, *fields))


def decode_message(raw: bytes) -> Message:
    """Decode bytes from :func:`encode_message`; raise ``ValueError`` if malformed."""
    items = _unpack(raw, "agreement message")
    kind, fields = items[0], items[1:]
    if kind == 1:
        _expect_len(fields, 2, "Prepare")
        return Prepare(_epoch(fields[0]), _dec_ballot(fields[1]))
    if kind == 2:
        _expect_len(fields, 3, "Promise")
        return Promise(_epoch(fields[0]), _dec_ballot(fields[1]), _dec_proposal_opt(fields[2]))
    if kind == 3:
        _expect_len(fields, 3, "Accept")
        return Accept(_epoch(fields[0]), _dec_ballot(fields[1]), _bytes(fields[2]))
    if kind == 4:
        _expect_len(fields, 2, "Accepted")
        return Accepted(_epoch(fields[0]), _dec_ballot(fields[1]))
    if kind == 5:
        _expect_len(fields, 4, "Reject")
        return Reject(
            _epoch(fields[0]),
            _dec_ballot(fields[1]),
            _epoch(fields[2], minimum=0),
            _dec_ballot_opt(fields[3]),
        )
    if kind == 6:
        _expect_len(fields, 2, "Commit")
        return Commit(_epoch(fields[0]), _bytes(fields[1]))
    raise ValueError(f"unknown agreement message kind {kind!r}")
