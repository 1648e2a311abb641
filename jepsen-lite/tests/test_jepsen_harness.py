"""The harness without a cluster: nemesis schedules and shapes, the backend's fault
bookkeeping (on a fake backend), error classification, the multi-value register
model and the strict-quorum staleness rule of the set checker."""

from __future__ import annotations

import ipaddress
import itertools
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from jepsen_lite.backends import docker, netns
from jepsen_lite.backends.base import (
    Backend,
    NodeFaults,
    blocked_from_groups,
    replication,
    set_inprocess_faults,
    settings_env,
)
from jepsen_lite.checkers.linearizable import check_linearizable
from jepsen_lite.checkers.mv_register import MultiValueRegisterModel
from jepsen_lite.checkers.set_checker import check_set
from jepsen_lite.errors import HarnessError
from jepsen_lite.history import HistoryRecorder
from jepsen_lite.nemesis import (
    NEMESES,
    EventLog,
    Fault,
    NemesisRunner,
    fault_windows,
    make_schedule,
    parse_nemeses,
    partition_shape,
)
from jepsen_lite.runner import exit_code, op_counts
from jepsen_lite.workloads import WorkloadOptions
from jepsen_lite.workloads.base import SafeRetryPolicy, WorkerContext, classify
from jepsen_lite.workloads.set_workload import SetWorkload

from kvcluster import Client, ReadResult, errors
from kvcluster.client.policies import Decision, NodeFailure
from kvcluster.wire.v1 import admin_pb2

IDS3 = ["n1", "n2", "n3"]
IDS5 = ["n1", "n2", "n3", "n4", "n5"]

# ----------------------------------------------------------------------------- nemesis


def test_schedule_is_deterministic_in_the_seed_and_fits_the_time_limit() -> None:
    a = make_schedule(list(NEMESES), IDS3, 60, seed=7)
    b = make_schedule(list(NEMESES), IDS3, 60, seed=7)
    c = make_schedule(list(NEMESES), IDS3, 60, seed=8)
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.to_dict() for f in a] != [f.to_dict() for f in c]
    assert len(a) >= 4
    for prev, f in itertools.pairwise(a):
        assert prev.end <= f.start  # one fault at a time
    assert all(f.start > 0 and f.end <= 59.0 + 1e-6 for f in a)
    assert {f.kind for f in a} <= set(NEMESES)
    assert make_schedule([], IDS3, 60, 1) == []


def test_every_enabled_nemesis_appears_in_a_long_schedule() -> None:
    faults = make_schedule(list(NEMESES), IDS5, 600, seed=1)
    assert {f.kind for f in faults} == set(NEMESES)
    for f in faults:
        if f.kind in ("kill", "pause"):
            assert 1 <= len(f.nodes) <= 2  # a minority of 5
        if f.kind == "loss":
            assert 0.1 <= f.params["probability"] <= 0.4
        if f.kind == "clock":
            assert set(f.params["offsets_ms"]) == set(IDS5)


def _connected(blocked: Mapping[str, list[str]], a: str, b: str) -> bool:
    return b not in blocked[a]


@pytest.mark.parametrize("ids", [IDS3, IDS5])
@pytest.mark.parametrize("shape", ["isolate", "halves", "bridge", "ring"])
def test_partition_shapes(ids: list[str], shape: str) -> None:
    import random

    if shape == "ring" and len(ids) < 5:
        return
    blocked = partition_shape(shape, ids, random.Random(3))
    for a in ids:
        assert a not in blocked[a]
        for b in blocked[a]:
            assert a in blocked[b]  # symmetric
    assert any(blocked.values())  # something is cut
    majority = len(ids) // 2 + 1
    degrees = {a: len(ids) - len(blocked[a]) for a in ids}  # including itself
    if shape == "isolate":
        assert sorted(degrees.values()) == [1] + [len(ids) - 1] * (len(ids) - 1)
    if shape == "halves":
        assert sorted(set(degrees.values())) == sorted({len(ids) // 2, len(ids) - len(ids) // 2})
    if shape == "ring":
        assert all(d >= majority for d in degrees.values())
        assert len({frozenset(blocked[a]) for a in ids}) == len(ids)  # no two alike
    if shape == "bridge":
        bridge = [a for a in ids if not blocked[a]]
        assert len(bridge) == 1
        others = [a for a in ids if a not in bridge]
        assert any(not _connected(blocked, a, b) for a in others for b in others if a != b)


def test_parse_nemeses() -> None:
    assert parse_nemeses("partition, kill") == ["partition", "kill"]
    assert parse_nemeses("none") == [] and parse_nemeses("") == []
    assert parse_nemeses("all") == list(NEMESES)
    with pytest.raises(ValueError, match="unknown nemesis bogus"):
        parse_nemeses("kill,bogus")


def test_fault_windows_pair_start_and_end(tmp_path: Path) -> None:
    ticks = itertools.count(0, 100)
    log = EventLog(tmp_path / "n.jsonl", lambda: next(ticks))
    log.phase("workload")
    log.emit("start", fault=0, kind="kill", nodes=["n1"], blocked={}, shape="x")
    log.emit("end", fault=0, kind="kill", nodes=["n1"])
    log.emit("start", fault=1, kind="pause", nodes=["n2"])
    log.close()
    windows = fault_windows(log.events, end_time=1000)
    assert windows == [
        {
            "id": 0,
            "kind": "kill",
            "nodes": ["n1"],
            "start": 100,
            "end": 200,
            "detail": {"shape": "x"},
        },
        {"id": 1, "kind": "pause", "nodes": ["n2"], "start": 300, "end": 1000, "detail": {}},
    ]
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 4


# ----------------------------------------------------------------------------- backend


class FakeBackend(Backend):
    """Records the hook calls; no processes."""

    name = "fake"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.calls: list[tuple[Any, ...]] = []
        self.installed: dict[str, NodeFaults] = {}

    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        return [f"n{i}" for i in range(1, nodes + 1)]

    def address(self, node: str) -> str:
        return f"127.0.0.1:{7500 + int(node[1:])}"

    def _kill_node(self, node: str) -> None:
        self.calls.append(("kill", node))

    def _start_node(self, node: str) -> None:
        self.calls.append(("start", node))
        self.installed.pop(node, None)  # a restart forgets in-process faults

    def _pause_node(self, node: str) -> None:
        self.calls.append(("pause", node))

    def _resume_node(self, node: str) -> None:
        self.calls.append(("resume", node))

    def _apply_faults(self, node: str, faults: NodeFaults) -> None:
        self.calls.append(("faults", node, faults))
        self.installed[node] = faults

    def _stop_cluster(self) -> None:
        self.calls.append(("stop",))

    def logs(self) -> dict[str, Path]:
        return {}


@pytest.fixture
def fake(tmp_path: Path) -> FakeBackend:
    b = FakeBackend(tmp_path)
    b.start(3, {})
    return b


class FailingBackend(FakeBackend):
    """Starts some nodes, then one of them dies."""

    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        self.calls.append(("started", nodes))
        raise HarnessError("node n2 exited during start")


def test_a_failed_start_removes_what_was_started(tmp_path: Path) -> None:
    b = FailingBackend(tmp_path)
    with pytest.raises(HarnessError, match="n2 exited"):
        b.start(3, {})
    assert b.calls == [("started", 3), ("stop",)]
    assert b.node_ids == []


class BootingBackend(FakeBackend):
    """Each node answers ``Status.ready`` from its ``ready_after``-th poll on."""

    def __init__(self, workdir: Path, ready_after: Mapping[str, int]) -> None:
        super().__init__(workdir)
        self.ready_after = dict(ready_after)
        self.polls: Counter[str] = Counter()

    def status(self, node: str, timeout: float = 2.0) -> admin_pb2.StatusResponse | None:
        self.polls[node] += 1
        return admin_pb2.StatusResponse(ready=self.polls[node] >= self.ready_after[node])


def test_await_ready_polls_each_node_until_ready(tmp_path: Path) -> None:
    b = BootingBackend(tmp_path, {"n1": 1, "n2": 3, "n3": 2})
    b._await_ready(IDS3, timeout=10.0, interval=0.0)
    assert b.polls == {"n1": 1, "n2": 3, "n3": 2}  # a ready node is not polled again


def test_await_ready_fails_at_once_on_an_exited_node_and_after_the_timeout(
    tmp_path: Path,
) -> None:
    b = BootingBackend(tmp_path, {"n1": 1, "n2": 10**9, "n3": 10**9})

    def exited(node: str) -> str | None:
        return "node n2 exited during start" if node == "n2" else None

    with pytest.raises(HarnessError, match="n2 exited during start"):
        b._await_ready(IDS3, timeout=5.0, exited=exited, interval=0.0)
    assert b.polls["n2"] == 0  # an exited node is not asked for its status
    with pytest.raises(HarnessError, match=r"^n2, n3 not ready after 0\.05s$"):
        b._await_ready(IDS3, timeout=0.05, interval=0.01)


def test_partition_is_made_symmetric_and_healed(fake: FakeBackend) -> None:
    fake.set_partition({"n1": ["n2"]})
    assert fake.installed["n1"].blocked == {"n2"}
    assert fake.installed["n2"].blocked == {"n1"}
    assert "n3" not in fake.installed  # untouched node: no call at all
    fake.partition([["n1"]])
    assert fake.installed["n1"].blocked == {"n2", "n3"}
    assert fake.installed["n3"].blocked == {"n1"}
    fake.heal_partition()
    assert all(f.healthy for f in fake.installed.values())


def test_faults_on_a_paused_or_killed_node_wait_until_it_runs(fake: FakeBackend) -> None:
    fake.pause("n2")
    fake.set_latency("n2", 10, 20)
    fake.set_clock_offset("n2", 5000)
    assert "n2" not in fake.installed  # a paused node cannot take an RPC
    fake.resume("n2")
    assert fake.installed["n2"] == NodeFaults(delay_ms=(10, 20), clock_offset_ms=5000)
    fake.kill("n2")
    assert fake.state("n2") == "killed"
    fake.start_node("n2")
    # the restart forgot the in-process faults; the backend put them back
    assert fake.installed["n2"] == NodeFaults(delay_ms=(10, 20), clock_offset_ms=5000)


def test_heal_undoes_everything(fake: FakeBackend) -> None:
    fake.pause("n1")
    fake.kill("n3")
    fake.set_loss("n2", 0.3)
    fake.partition([["n2"]])
    done = fake.heal()
    assert done == ["resumed n1", "started n3", "healed n1", "healed n2", "healed n3"]
    assert all(fake.state(n) == "running" for n in fake.node_ids)
    assert all(fake.faults(n).healthy for n in fake.node_ids)
    assert all(fake.installed[n].healthy for n in fake.node_ids)


def test_heal_also_clears_faults_the_bookkeeping_does_not_know(fake: FakeBackend) -> None:
    fake.installed["n2"] = NodeFaults(loss=0.5)  # e.g. left behind by a half-failed call
    assert fake.heal() == []  # nothing known to undo
    assert all(fake.installed[n].healthy for n in fake.node_ids)


def test_kill_thaws_a_paused_node_first(fake: FakeBackend) -> None:
    fake.pause("n1")
    fake.kill("n1")
    fake.kill("n1")  # already killed: nothing more
    assert fake.calls == [("pause", "n1"), ("resume", "n1"), ("kill", "n1")]
    assert fake.state("n1") == "killed"
    fake.resume("n1")  # only a paused node resumes
    assert fake.state("n1") == "killed" and len(fake.calls) == 3


def test_nemesis_runner_applies_and_heals_each_fault(fake: FakeBackend, tmp_path: Path) -> None:
    blocked = {"n1": ["n2", "n3"], "n2": ["n1"], "n3": ["n1"]}
    schedule = [
        Fault(0, "partition", 0.0, 0.02, ["n1"], {"shape": "isolate", "blocked": blocked}),
        Fault(1, "pause", 0.03, 0.02, ["n2"]),
        Fault(2, "latency", 0.06, 0.02, ["n1", "n3"], {"delay_ms": [5, 9]}),
    ]
    log = EventLog(tmp_path / "nemesis.jsonl", lambda: 0)
    runner = NemesisRunner(fake, schedule, log, origin=time.monotonic())
    runner.start()
    runner.join(timeout=10.0)
    assert not runner.is_alive() and runner.errors == []
    starts = [e for e in log.events if e["type"] == "start"]
    assert [e["fault"] for e in starts] == [0, 1, 2]
    assert starts[0]["shape"] == "isolate" and starts[0]["blocked"] == blocked
    assert starts[2]["delay_ms"] == [5, 9]
    assert [e["fault"] for e in log.events if e["type"] == "end"] == [0, 1, 2]
    assert ("pause", "n2") in fake.calls and ("resume", "n2") in fake.calls
    installed = [c[1:] for c in fake.calls if c[0] == "faults"]
    assert installed[0] == ("n1", NodeFaults(blocked=frozenset({"n2", "n3"})))
    assert ("n1", NodeFaults(delay_ms=(5.0, 9.0))) in installed
    assert all(fake.faults(n).healthy and fake.state(n) == "running" for n in fake.node_ids)


def test_backend_rejects_bad_fault_arguments(fake: FakeBackend) -> None:
    with pytest.raises(HarnessError, match="unknown node"):
        fake.kill("n9")
    with pytest.raises(HarnessError, match="loss"):
        fake.set_loss("n1", 1.5)
    with pytest.raises(HarnessError, match="latency"):
        fake.set_latency("n1", 20, 10)
    with pytest.raises(HarnessError, match="overlap"):
        fake.partition([["n1", "n2"], ["n2"]])


def test_blocked_from_groups_and_settings_env() -> None:
    assert blocked_from_groups([["n1"], ["n2"]], IDS3) == {
        "n1": {"n2", "n3"},
        "n2": {"n1", "n3"},
        "n3": {"n1", "n2"},
    }
    env = settings_env({"unsafe_lww": True, "aae_interval": 15.0, "seeds": ["a", "b"]})
    assert env == {
        "KVCLUSTER_AAE_INTERVAL": "15.0",
        "KVCLUSTER_SEEDS": "a,b",
        "KVCLUSTER_UNSAFE_LWW": "true",
    }


def test_replication_splits_n_r_w_off_the_settings_with_kvctl_dev_defaults() -> None:
    assert replication({"request_timeout": 2}, 5) == ({"request_timeout": 2}, 3, 2, 2)
    assert replication({"n_val": "5", "r": 1}, 5) == ({}, 5, 1, 3)
    assert replication({"w": "1"}, 1) == ({}, 1, 1, 1)


def test_network_backends_keep_only_latency_and_clock_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = NodeFaults(frozenset({"n2"}), loss=0.3, delay_ms=(1.0, 2.0), clock_offset_ms=-5)
    in_process = NodeFaults(delay_ms=(1.0, 2.0), clock_offset_ms=-5)
    assert faults.latency_and_clock() == in_process
    # the netns and docker backends: partitions and loss as iptables rules, the rest in-process
    commands: list[tuple[str, ...]] = []
    sent: list[tuple[str, NodeFaults]] = []

    def run(*argv: str, **_: Any) -> subprocess.CompletedProcess[str]:
        commands.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def set_faults(address: str, faults: NodeFaults, timeout: float = 3.0) -> None:
        sent.append((address, faults))

    for module in (netns, docker):
        monkeypatch.setattr(module, "_run", run)
        monkeypatch.setattr(module, "set_inprocess_faults", set_faults)

    ns = netns.NetnsBackend(tmp_path)
    for i, n in enumerate(IDS3, start=1):
        ip = f"10.77.0.{10 + i}"
        ns._nodes[n] = netns._Node(n, f"kvj-{n}", ip, f"kvjh{i}", tmp_path, tmp_path, [], {})
    ns._apply_faults("n1", faults)
    assert sent == [("10.77.0.11:7500", in_process)]
    inside = ("ip", "netns", "exec", "kvj-n1", "iptables", "-A")
    assert (*inside, "KVJ-PART", "-d", "10.77.0.12", "-j", "DROP") in commands
    assert any(c[: len(inside) + 1] == (*inside, "KVJ-LOSS") and "0.3000" in c for c in commands)

    net = docker.DockerBackend(tmp_path, image="unused")
    net._ips = {n: f"10.78.0.{10 + i}" for i, n in enumerate(IDS3, start=1)}
    net._subnet = ipaddress.IPv4Network("10.78.0.0/24")
    commands.clear()
    net._apply_faults("n1", faults)  # host iptables usable
    chain = ("iptables", "-A", net._node_chain("n1"))
    assert (*chain, "-s", "10.78.0.11", "-d", "10.78.0.12", "-j", "DROP") in commands
    assert any(c[:3] == chain and "0.3000" in c for c in commands)
    net.inprocess_reason = "not root"  # no host iptables: every fault is in-process
    net._apply_faults("n1", faults)
    assert sent[1:] == [("10.78.0.11:7101", in_process), ("10.78.0.11:7101", faults)]


def test_an_unreachable_node_cannot_get_faults_and_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nothing listens on
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(HarnessError, match=f"{address}: cannot set faults"):
            set_inprocess_faults(address, NodeFaults(), timeout=0.5)


# ----------------------------------------------------------------------------- outcomes


def test_classify_outcomes() -> None:
    assert classify(errors.Unavailable(2, 1), write=True) == "fail"
    assert classify(errors.Overloaded(), write=True) == "fail"
    assert classify(errors.Timeout(2, 1), write=True) == "info"
    assert classify(errors.Unreachable(["a"]), write=True) == "info"  # may have been sent
    assert classify(errors.Internal("boom"), write=True) == "info"
    assert classify(errors.Timeout(2, 1), write=False) == "info"  # a timeout is never fail
    assert classify(errors.Internal("boom"), write=False) == "fail"  # reads change nothing


def test_safe_retry_policy_never_retries_a_write_that_may_have_been_sent() -> None:
    p = SafeRetryPolicy()
    refused = NodeFailure("a", "unreachable (failed to connect to all addresses)", sent=False)
    reset = NodeFailure("a", "unreachable (Socket closed)", sent=False)
    late = NodeFailure("a", "no answer before the deadline", sent=True)
    assert p.decide("put", refused, 1) is Decision.RETRY_NEXT
    assert p.decide("put", reset, 1) is Decision.RAISE
    assert p.decide("put", late, 1) is Decision.RAISE
    assert p.decide("get", reset, 1) is Decision.RETRY_NEXT
    assert p.decide("get", late, 1) is Decision.RETRY_NEXT
    assert p.decide("get", late, 3) is Decision.RAISE
    assert p.decide("put", errors.NotReady("no ring"), 1) is Decision.RETRY_NEXT
    assert p.decide("put", errors.Unavailable(2, 1), 1) is Decision.RAISE


def test_exit_codes_and_op_counts(rec: HistoryRecorder) -> None:
    assert (exit_code(True), exit_code(False), exit_code("unknown")) == (0, 1, 2)
    rec.invoke(0, "add", "k", 1)
    rec.ok(0, 1)
    rec.invoke(1, "add", "k", 2)
    rec.info(1, 2)
    rec.invoke(2, "read", "k")
    assert op_counts(rec.history) == {
        "add": {"invoke": 2, "ok": 1, "fail": 0, "info": 1},
        "read": {"invoke": 1, "ok": 0, "fail": 0, "info": 1},
    }


class _FlakyReads:
    """A client whose first read of each key times out; later reads find ``[1, 2]``."""

    def __init__(self) -> None:
        self.gets: list[tuple[str, dict[str, Any]]] = []

    def get(self, key: str, **options: Any) -> ReadResult:
        self.gets.append((key, options))
        if [k for k, _ in self.gets].count(key) == 1:
            raise errors.Timeout(2, 1)
        return ReadResult(True, [b"[2]", b"[1]"], b"ctx")


def test_final_reads_read_every_key_with_r_all_until_they_succeed(rec: HistoryRecorder) -> None:
    workload = SetWorkload(WorkloadOptions(extra={"active_keys": 2}))
    client = _FlakyReads()
    ctx = WorkerContext(
        worker=0,
        concurrency=1,
        recorder=rec,
        client=cast(Client, client),
        rng=random.Random(0),
        stop=threading.Event(),
        base=1_000_000,
        backoff=0.0,
    )
    workload.final_reads(ctx, pause=0.0)
    assert workload.keys() == ["set-0", "set-1"]
    all_strict = {"r": "all", "strict": True}
    assert client.gets == [(k, all_strict) for k in ("set-0", "set-0", "set-1", "set-1")]
    assert [op.type for op in rec.history if op.type != "invoke"] == ["info", "ok"] * 2
    assert [(op.key, op.value) for op in rec.history if op.type == "ok"] == [
        ("set-0", [1, 2]),  # the union of the siblings, as the set checker reads it
        ("set-1", [1, 2]),
    ]
    assert all(op.extra == {"final": True} for op in rec.history if op.type == "invoke")


# ----------------------------------------------------------------------------- models


def test_multi_value_register_model_accepts_siblings_and_contexts(rec: HistoryRecorder) -> None:
    rec.invoke(0, "read", "k")
    rec.ok(0, [])
    rec.invoke(0, "write", "k", 1, {"seen": []})
    rec.ok(0, 1)
    rec.invoke(1, "write", "k", 2)  # blind: a sibling
    rec.ok(1, 2)
    rec.invoke(2, "read", "k")
    rec.ok(2, [2, 1])
    rec.invoke(0, "write", "k", 3, {"seen": [1, 2]})
    rec.ok(0, 3)
    rec.invoke(2, "read", "k")
    rec.ok(2, [3])
    assert check_linearizable(rec.history, MultiValueRegisterModel()).valid is True


def test_multi_value_register_model_rejects_a_stale_read(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.ok(0, 1)
    rec.invoke(0, "write", "k", 2, {"seen": [1]})
    rec.ok(0, 2)
    rec.invoke(1, "read", "k")
    rec.ok(1, [1])  # the write of 2 replaced 1 before this read began
    result = check_linearizable(rec.history, MultiValueRegisterModel())
    assert result.valid is False
    cex = result.invalid_keys[0].counterexample
    assert cex is not None and cex.state == [2]  # rendered as JSON


def test_multi_value_register_model_pending_write_may_land_late(rec: HistoryRecorder) -> None:
    rec.invoke(0, "write", "k", 1)
    rec.info(0, 1)  # unknown outcome
    rec.invoke(1, "read", "k")
    rec.ok(1, [])
    rec.invoke(1, "read", "k")
    rec.ok(1, [1])  # it landed after all
    assert check_linearizable(rec.history, MultiValueRegisterModel()).valid is True


def test_set_checker_stale_after_ack_only_judges_acknowledged_adds(
    rec: HistoryRecorder,
) -> None:
    rec.invoke(0, "add", "s", 1)
    rec.ok(0, 1)
    rec.invoke(1, "add", "s", 2)
    rec.info(1, 2)  # in flight, partially applied
    rec.invoke(2, "read", "s")
    rec.ok(2, [1, 2])
    rec.invoke(2, "read", "s")
    rec.ok(2, [1])  # missing 2: fine, its add was never acknowledged
    rec.invoke(3, "read", "s", None, {"final": True})
    rec.ok(3, [1, 2])
    strict = check_set(rec.history, allow_stale=False, stale_after_ack=True)
    assert strict.valid is True and strict.stale == []
    loose = check_set(rec.history, allow_stale=False)
    assert loose.valid is False and [a.element for a in loose.stale] == [2]


def test_set_checker_stale_after_ack_reports_a_missed_acknowledged_add(
    rec: HistoryRecorder,
) -> None:
    rec.invoke(0, "add", "s", 1)
    rec.ok(0, 1)
    rec.invoke(1, "read", "s")
    rec.ok(1, [])  # began after the ack: must see 1 under strict quorums
    rec.invoke(1, "read", "s", None, {"final": True})
    rec.ok(1, [1])
    result = check_set(rec.history, allow_stale=False, stale_after_ack=True)
    assert result.valid is False and [a.element for a in result.stale] == [1]
    assert result.lost == []


# ----------------------------------------------------------------------------- cli


def test_netns_without_root_is_a_harness_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jepsen_lite import cli

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    out = tmp_path / "run"
    code = cli.main(["run", "--backend", "netns", "--time-limit", "1", "--out", str(out)])
    assert code == 2
    assert "needs root" in capsys.readouterr().err
    assert not out.exists()  # nothing was started or written


def test_netns_without_iptables_is_a_harness_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from jepsen_lite.backends import netns

    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "iptables" else "/x")
    with pytest.raises(HarnessError, match="needs 'iptables'"):
        netns.preflight()


def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jepsen_lite import cli

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["run", "--out", str(tmp_path / "full"), "--time-limit", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["run", "--nemesis", "kill,meteor", "--out", str(tmp_path / "a")]) == 2
    assert "unknown nemesis meteor" in capsys.readouterr().err
    assert cli.main(["run", "--unsafe", "yolo", "--out", str(tmp_path / "b")]) == 2
    assert "unknown --unsafe" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "nothing-here")]) == 2
    assert "not a jepsen-lite run directory" in capsys.readouterr().err


def test_nothing_is_started_after_stop(fake: FakeBackend) -> None:
    fake.kill("n1")
    fake.stop()
    with pytest.raises(HarnessError, match="stopped"):
        fake.start_node("n1")
    assert ("start", "n1") not in fake.calls
    fake.stop()  # idempotent
