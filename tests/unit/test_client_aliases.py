"""The client reaches ring members through their seed addresses (NAT, published ports).

Nodes advertise the addresses they use among themselves (``n1.cluster:7101`` in
docker-compose); a client outside sees the same nodes at other addresses (the
published ports it was given as seeds). The router learns, per seed, which
member answers there and routes to that member through the seed address.
"""

from __future__ import annotations

from kvcluster.client import TokenAwarePolicy
from kvcluster.client._core import RingView, Router
from kvcluster.client.policies import NodeHealth
from kvcluster.core.hashing import partition_of
from kvcluster.net.grpc_transport import never_connected
from kvcluster.wire.v1 import admin_pb2

SEEDS = ["127.0.0.1:7601", "127.0.0.1:7602", "127.0.0.1:7603"]


def ring_response(addresses: dict[str, str], q: int = 8) -> admin_pb2.RingResponse:
    ids = sorted(addresses)
    return admin_pb2.RingResponse(
        epoch=1,
        partitions=q,
        n_val=3,
        members=[admin_pb2.RingMember(id=i, address=addresses[i]) for i in ids],
        owners=[admin_pb2.PartitionOwners(owners=ids[p % 3 :] + ids[: p % 3]) for p in range(q)],
    )


def router(seeds: list[str] = SEEDS) -> Router:
    return Router(seeds, TokenAwarePolicy(rotate=False), NodeHealth())


NAT = {"n1": "n1.cluster:7101", "n2": "n2.cluster:7101", "n3": "n3.cluster:7101"}


def test_seeds_that_are_advertised_addresses_need_no_identification() -> None:
    r = router()
    resp = ring_response({"n1": SEEDS[0], "n2": SEEDS[1], "n3": SEEDS[2]})
    assert r.seeds_to_identify(resp) == []
    view = RingView.from_response(resp, r.aliases)
    assert view.addresses == tuple(sorted(SEEDS))


def test_members_behind_nat_are_reached_through_their_seed() -> None:
    r = router()
    resp = ring_response(NAT)
    assert r.seeds_to_identify(resp) == SEEDS
    for i, seed in enumerate(SEEDS, start=1):
        r.learn_alias(f"n{i}.cluster:7101", seed)  # what Admin.Status at the seed said
    assert r.seeds_to_identify(resp) == []  # asked once per seed, not on every refresh
    r.ring = RingView.from_response(resp, r.aliases)
    assert r.ring.addresses == tuple(sorted(SEEDS))
    assert r.nodes() == tuple(sorted(SEEDS))  # no unreachable cluster-internal address
    key = b"user:1"
    owners = resp.owners[partition_of(key, 8)].owners
    expected = [SEEDS[int(o[1:]) - 1] for o in owners]
    assert list(r.ring.replicas(key)) == expected
    assert r.plan(key)[:3] == expected  # token-aware routing still goes to the replicas


def test_a_seed_that_did_not_answer_is_identified_later() -> None:
    r = router()
    resp = ring_response(NAT)
    r.learn_alias("n1.cluster:7101", SEEDS[0])
    assert r.seeds_to_identify(resp) == SEEDS[1:]
    view = RingView.from_response(resp, r.aliases)
    # the unidentified members keep their advertised address (tried, then avoided)
    assert set(view.addresses) == {SEEDS[0], "n2.cluster:7101", "n3.cluster:7101"}


def test_first_seed_wins_and_self_aliases_are_ignored() -> None:
    r = router()
    r.learn_alias("n1.cluster:7101", SEEDS[0])
    r.learn_alias("n1.cluster:7101", "localhost:7601")
    r.learn_alias(SEEDS[1], SEEDS[1])
    assert r.aliases == {"n1.cluster:7101": SEEDS[0]}


def test_behind_nat_members_not_identified_are_tried_last() -> None:
    """n2's seed was down when the client asked: its cluster-internal address stays
    in the ring but goes after every address the client can vouch for."""
    r = router()
    resp = ring_response(NAT)
    r.learn_alias("n1.cluster:7101", SEEDS[0])
    r.learn_alias("n3.cluster:7101", SEEDS[2])
    r.ring = RingView.from_response(resp, r.aliases)
    assert r.nodes()[-1] == "n2.cluster:7101"
    assert set(r.nodes()[:-1]) == set(SEEDS)
    for key in (b"a", b"b", b"user:1", b"user:2"):
        plan = r.plan(key)
        assert plan[-1] == "n2.cluster:7101", plan
        assert set(plan[:-1]) == set(SEEDS)


def test_without_nat_the_token_aware_order_is_kept() -> None:
    r = router(["127.0.0.1:7101"])
    addresses = {"n1": "127.0.0.1:7101", "n2": "127.0.0.1:7102", "n3": "127.0.0.1:7103"}
    resp = ring_response(addresses)
    assert r.seeds_to_identify(resp) == []
    r.ring = RingView.from_response(resp, r.aliases)
    key = b"user:1"
    owners = resp.owners[partition_of(key, 8)].owners
    assert r.plan(key)[:3] == [addresses[o] for o in owners]


def test_an_unresolvable_member_address_counts_as_never_connected() -> None:
    """What grpcio 1.85 reports for a name the client cannot resolve (n2.cluster
    outside the compose network): the request never left, so a write may go to
    the next node."""
    details = (
        "errors resolving n2.cluster:7101: [field:hostname lookup error:address "
        "lookup failed for n2.cluster:7101: Domain name not found]"
    )
    assert never_connected(details)
