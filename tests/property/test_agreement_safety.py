"""Randomised safety and liveness of kvcluster.core.agreement on a simulated network.

A tiny in-memory network, driven by ``random.Random(seed)``, delivers
messages after a random delay (so in random order), drops some while the
network is "stormy" and duplicates some throughout. Acceptors keep their
state only as the bytes they would persist; every message is round-tripped
through the wire encoding. Proposers time out, retransmit, and retry with
higher rounds after a randomised exponential backoff.

An oracle watches every vote. A value is *chosen* for an epoch when a
majority of that epoch's voters accepted it under one ballot; safety is that
no epoch ever gets two chosen values, and that every ``Chosen`` outcome,
``Commit`` and ``Stale`` agrees with the oracle. Liveness is that once drops
stop, every proposer gets through all its epochs within a bounded time.

A failure names its seed; ``Sim(seed, ...).run()`` replays it exactly.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvcluster.core.agreement import (
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Chosen,
    Commit,
    Message,
    Outcome,
    Outgoing,
    Phase,
    Prepare,
    Promise,
    Proposer,
    Reject,
    Retry,
    Stale,
    decode_message,
    encode_message,
    handle,
    majority,
)

UNIVERSE = ("a", "b", "c", "d", "e")


def members_of(value: bytes) -> tuple[str, ...]:
    """Values in these tests are ``<proposer>|<epoch>|<round>|<member,member,...>``."""
    return tuple(value.decode().rsplit("|", 1)[1].split(","))


@dataclass(order=True)
class Flight:
    at: int
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    raw: bytes = field(compare=False)


@dataclass
class ProposerNode:
    node_id: str
    voters: tuple[str, ...]
    epoch: int = 1
    next_round: int = 1
    attempt: Proposer | None = None
    start_at: int | None = 0
    deadline: int = 0
    retransmits: int = 0
    failures: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    done: bool = False


class Sim:
    def __init__(
        self,
        seed: int,
        *,
        n_acceptors: int,
        n_proposers: int,
        epochs: int = 1,
        reconfigure: bool = False,
        drop: float = 0.0,
        dup: float = 0.0,
        straggle: float = 0.0,
        max_delay: int = 3,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.seeds = UNIVERSE[:n_acceptors]
        self.epochs = epochs
        self.reconfigure = reconfigure
        self.drop = drop
        self.dup = dup
        self.straggle = straggle
        self.max_delay = max_delay
        self.timeout = 4 * max_delay + 2
        self.now = 0
        self.seq = 0
        self.flights: list[Flight] = []
        #: node -> side; messages between different sides are lost.
        self.sides: dict[str, int] | None = None
        #: The acceptors' durable state, exactly as they would persist it.
        self.disk = {a: AcceptorState().encode() for a in UNIVERSE}
        self.proposers = {
            f"p{i}": ProposerNode(f"p{i}", self.seeds, start_at=self.rng.randint(0, max_delay))
            for i in range(n_proposers)
        }
        # The oracle.
        self.voters_of: dict[int, tuple[str, ...]] = {1: self.seeds}
        self.chosen: dict[int, bytes] = {}
        self.votes: dict[tuple[int, Ballot], set[str]] = defaultdict(set)
        self.ballot_value: dict[tuple[int, Ballot], bytes] = {}
        self.delivered = 0
        self.calm_ticks = 0

    # -- network ---------------------------------------------------------------

    def send(self, src: str, dst: str, msg: Message) -> None:
        if self.sides is not None and self.sides[src] != self.sides[dst]:
            return
        if self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.seq += 1
            delay = self.rng.randint(1, self.max_delay)
            if self.rng.random() < self.straggle:
                delay *= self.rng.randint(2, 20)  # a straggler, outliving its attempt
            at = self.now + delay
            self.flights.append(Flight(at, self.seq, src, dst, encode_message(msg)))

    def send_all(self, src: str, outgoing: Iterable[Outgoing]) -> None:
        for out in outgoing:
            self.send(src, out.to, out.msg)

    # -- nodes -----------------------------------------------------------------

    def deliver(self, flight: Flight) -> None:
        self.delivered += 1
        msg = decode_message(flight.raw)
        if flight.dst in self.proposers:
            assert isinstance(msg, Promise | Accepted | Reject), msg
            self.to_proposer(self.proposers[flight.dst], flight.src, msg)
            return
        assert isinstance(msg, Prepare | Accept | Commit), msg
        if isinstance(msg, Commit):
            assert self.chosen.get(msg.epoch) == msg.value, f"commit of an unchosen value {msg}"
        state = AcceptorState.decode(self.disk[flight.dst])
        new, reply = handle(state, msg)
        if new != state:
            self.disk[flight.dst] = new.encode()
        for epoch in range(1, new.epoch):
            assert epoch in self.chosen, f"{flight.dst} thinks undecided epoch {epoch} decided"
        if isinstance(reply, Accepted):
            assert isinstance(msg, Accept)
            self.vote(flight.dst, msg)
        if reply is not None:
            self.send(flight.dst, flight.src, reply)

    def vote(self, acceptor: str, msg: Accept) -> None:
        key = (msg.epoch, msg.ballot)
        assert self.ballot_value.setdefault(key, msg.value) == msg.value, f"ballot reused {key}"
        voters = self.voters_of[msg.epoch]
        assert acceptor in voters, f"{acceptor} voted in epoch {msg.epoch} among {voters}"
        self.votes[key].add(acceptor)
        if len(self.votes[key]) < majority(len(voters)):
            return
        previous = self.chosen.setdefault(msg.epoch, msg.value)
        assert previous == msg.value, (
            f"two values chosen for epoch {msg.epoch}: {previous!r} and {msg.value!r}"
        )
        self.voters_of.setdefault(msg.epoch + 1, self.next_voters(msg.value))

    def next_voters(self, value: bytes) -> tuple[str, ...]:
        return members_of(value) if self.reconfigure else self.seeds

    def to_proposer(
        self, node: ProposerNode, sender: str, msg: Promise | Accepted | Reject
    ) -> None:
        if node.attempt is None:
            return  # late reply to an abandoned attempt
        step = node.attempt.on_message(sender, msg)
        self.send_all(node.node_id, step.outgoing)
        if step.outcome is not None:
            self.finish(node, step.outcome)

    def finish(self, node: ProposerNode, outcome: Outcome) -> None:
        node.outcomes.append(outcome)
        node.attempt = None
        if isinstance(outcome, Retry):
            node.next_round = max(node.next_round, outcome.next_round)
            self.back_off(node)
            return
        if isinstance(outcome, Chosen):
            assert outcome.epoch == node.epoch
            assert self.chosen.get(outcome.epoch) == outcome.value, (
                f"{node.node_id} told {outcome}; the oracle has {self.chosen.get(outcome.epoch)!r}"
            )
            learned = outcome.epoch
        else:
            assert outcome.committed_epoch >= node.epoch
            learned = outcome.committed_epoch
            # The caller would now fetch metadata version `learned` from a peer.
            assert learned in self.chosen, f"{node.node_id} told {outcome}: not decided"
        node.epoch = learned + 1
        node.voters = self.next_voters(self.chosen[learned])
        assert node.voters == self.voters_of[node.epoch]
        node.next_round = 1
        node.failures = 0
        if node.epoch > self.epochs:
            node.done = True
        else:
            node.start_at = self.now + self.rng.randint(1, self.max_delay)

    def back_off(self, node: ProposerNode) -> None:
        node.failures += 1
        ceiling = min(16 * self.max_delay, self.max_delay << min(node.failures, 6))
        node.start_at = self.now + self.rng.randint(1, ceiling)

    def begin(self, node: ProposerNode) -> None:
        if self.reconfigure:
            size = self.rng.randint(1, len(UNIVERSE))
            members = sorted(self.rng.sample(UNIVERSE, size))
        else:
            members = list(self.seeds)
        value = f"{node.node_id}|{node.epoch}|{node.next_round}|{','.join(members)}".encode()
        attempt = Proposer(node.node_id, node.epoch, value, node.voters, round=node.next_round)
        node.next_round += 1
        node.attempt = attempt
        node.start_at = None
        node.deadline = self.now + self.timeout
        node.retransmits = 0
        self.send_all(node.node_id, attempt.start())

    def tick_proposer(self, node: ProposerNode) -> None:
        if node.done:
            return
        if node.attempt is None:
            if node.start_at is not None and self.now >= node.start_at:
                self.begin(node)
            return
        if self.now < node.deadline:
            return
        if node.retransmits < 2 and self.rng.random() < 0.5:
            node.retransmits += 1
            node.deadline = self.now + self.timeout
            self.send_all(node.node_id, node.attempt.retransmit())
        else:
            node.attempt = None
            self.back_off(node)

    # -- driving ---------------------------------------------------------------

    def step(self) -> None:
        self.now += 1
        for node_id in sorted(self.proposers):
            self.tick_proposer(self.proposers[node_id])
        due = [f for f in self.flights if f.at <= self.now]
        self.flights = [f for f in self.flights if f.at > self.now]
        due.sort()
        self.rng.shuffle(due)
        for flight in due:
            self.deliver(flight)

    def all_done(self) -> bool:
        return all(node.done for node in self.proposers.values())

    def run_until_done(self, limit: int) -> None:
        for _ in range(limit):
            if self.all_done():
                return
            self.step()

    def run(self, storm_ticks: int, calm_limit: int) -> None:
        """Drop messages for ``storm_ticks``, then stop dropping and require progress."""
        for _ in range(storm_ticks):
            self.step()
        self.drop = 0.0
        calm_start = self.now
        self.run_until_done(calm_limit)
        self.calm_ticks = self.now - calm_start
        assert self.all_done(), f"no progress after the storm: {self.proposers}"
        assert sorted(self.chosen) == list(range(1, self.epochs + 1))


def random_sim(seed: int, *, epochs: int, reconfigure: bool) -> tuple[Sim, int]:
    """A simulation with parameters drawn from ``seed``, and its storm length."""
    rng = random.Random(seed)
    sim = Sim(
        seed,
        n_acceptors=rng.choice((3, 5)),
        n_proposers=rng.choice((2, 3)),
        epochs=epochs,
        reconfigure=reconfigure,
        drop=rng.uniform(0.0, 0.5),
        dup=rng.uniform(0.0, 0.3),
        straggle=rng.choice((0.0, 0.05, 0.2)),
        max_delay=rng.randint(1, 6),
    )
    return sim, rng.randint(0, 400)


def run_seed(seed: int, *, epochs: int, reconfigure: bool) -> Sim:
    """Run one seed; call this to replay a failure."""
    sim, storm = random_sim(seed, epochs=epochs, reconfigure=reconfigure)
    try:
        sim.run(storm_ticks=storm, calm_limit=CALM_LIMIT)
    except AssertionError as exc:
        raise AssertionError(
            f"seed={seed} failed (replay: run_seed({seed}, epochs={epochs}, "
            f"reconfigure={reconfigure})): {exc}"
        ) from exc
    return sim


#: Ticks after drops stop within which every proposer must be through.
CALM_LIMIT = 3_000


def check_seeds(seeds: range, *, epochs: int, reconfigure: bool) -> list[Sim]:
    return [run_seed(seed, epochs=epochs, reconfigure=reconfigure) for seed in seeds]


def test_one_value_per_epoch_and_progress_once_drops_stop() -> None:
    sims = check_seeds(range(300), epochs=1, reconfigure=False)
    # The runs really were contended: some proposers were preempted or adopted
    # another proposer's value, and some learned the outcome only as Stale.
    outcomes = [o for sim in sims for node in sim.proposers.values() for o in node.outcomes]
    assert any(isinstance(o, Retry) for o in outcomes)
    assert any(isinstance(o, Stale) for o in outcomes)
    adopted = [
        (sim.seed, node.node_id)
        for sim in sims
        for node in sim.proposers.values()
        for o in node.outcomes
        if isinstance(o, Chosen) and not o.value.startswith(node.node_id.encode())
    ]
    assert adopted


def test_many_epochs_with_changing_voters() -> None:
    sims = check_seeds(range(1000, 1200), epochs=4, reconfigure=True)
    assert any(len(set(sim.voters_of.values())) > 2 for sim in sims)


# -- partitions ------------------------------------------------------------------


def test_minority_side_never_chooses_and_majority_side_does() -> None:
    """Hand-driven: voters a..e, one proposer reaches {a, b}, the other {c, d, e}."""
    voters = UNIVERSE
    disk = {v: AcceptorState() for v in voters}

    def ask(
        proposer: Proposer, outgoing: Iterable[Outgoing], reachable: set[str]
    ) -> list[Outgoing]:
        """Deliver to the reachable voters and feed their replies back; return new requests."""
        more: list[Outgoing] = []
        for out in outgoing:
            if out.to not in reachable:
                continue
            disk[out.to], reply = handle(disk[out.to], out.msg)
            if reply is not None:
                step = proposer.on_message(out.to, reply)
                more.extend(step.outgoing)
                assert not isinstance(step.outcome, Chosen)
        return more

    minority = {"a", "b"}
    for round_ in range(1, 20):
        small = Proposer("pa", 1, b"minority", voters, round=round_)
        requests = small.start()
        for _ in range(3):  # retransmissions reach the same two voters again
            requests += ask(small, requests + small.retransmit(), minority)
        assert small.outcome is None and small.phase is Phase.PREPARE

    big = Proposer("pc", 1, b"majority", voters, round=1)
    outgoing = big.start()
    for _ in range(3):
        more: list[Outgoing] = []
        for out in outgoing:
            if out.to in {"c", "d", "e"}:
                disk[out.to], reply = handle(disk[out.to], out.msg)
                if reply is not None:
                    more.extend(big.on_message(out.to, reply).outgoing)
        outgoing = more
    assert big.outcome == Chosen(1, b"majority")
    assert {v: s.epoch for v, s in disk.items()} == {"a": 1, "b": 1, "c": 2, "d": 2, "e": 2}

    # Healed: the minority proposer learns that epoch 1 is decided.
    late = Proposer("pa", 1, b"minority", voters, round=20)
    replies = []
    for out in late.start():
        disk[out.to], reply = handle(disk[out.to], out.msg)
        assert reply is not None
        replies.append((out.to, reply))
    outcomes = [late.on_message(sender, reply).outcome for sender, reply in replies]
    assert Stale(1) in outcomes
    assert not any(isinstance(o, Chosen) for o in outcomes)


def test_random_partitions_only_the_majority_side_decides() -> None:
    for seed in range(2000, 2100):
        rng = random.Random(seed)
        sim = Sim(
            seed,
            n_acceptors=5,
            n_proposers=2,
            dup=rng.uniform(0.0, 0.3),
            max_delay=rng.randint(1, 6),
        )
        small_side = set(rng.sample(UNIVERSE, rng.randint(0, 2)))
        sim.sides = {n: 0 if n in small_side else 1 for n in UNIVERSE}
        sim.sides |= {"p0": 0, "p1": 1}
        try:
            for _ in range(400):
                sim.step()
                assert not any(isinstance(o, Chosen) for o in sim.proposers["p0"].outcomes)
            assert sim.proposers["p1"].outcomes[-1:] == [Chosen(1, sim.chosen[1])]
            sim.sides = None
            sim.run_until_done(20_000)
            assert sim.all_done()
            assert sim.proposers["p0"].outcomes[-1] == Stale(1)
        except (AssertionError, KeyError) as exc:
            raise AssertionError(f"seed={seed} failed: {exc!r}") from exc
