"""Whole-cluster deterministic simulation: many seeds, faults, no acknowledged write lost.

Every seed is a full run (:func:`kvcluster.sim.cluster.run_cluster`): a 3- or
5-node cluster on the simulated network, a seeded fault schedule (crashes and
restarts, a disk lost while cut off, crashes right after an acknowledgement,
partitions of several shapes, drops, duplicates, latency, slow nodes, clock
skew) under concurrent clients, then heal, hinted handoff, anti-entropy, and
the checks: (a) every replica of every key holds the identical record, (b) no
acknowledged write is lost unless a later write or delete whose context had
seen it superseded it, no value that was never written (or whose write
failed) is visible, (c) no acknowledged delete is undone. A failing seed
prints the command that replays it.

The same checks must fail for the planted bugs (``unsafe_ack_before_w``,
``unsafe_lww``): that is what shows the checker catches real loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcluster.sim.cluster import (
    FaultSchedule,
    RunResult,
    WorkloadConfig,
    derive_rng,
    run_cluster,
    sim_settings,
)

ROOT = Path(__file__).resolve().parents[2]

#: Seeds of the fault campaign; even seeds run 3 nodes, odd seeds 5.
SEEDS = range(200)
#: Seeds of the planted-bug runs (a subset of SEEDS, so each also passes safely).
PLANTED_SEEDS = range(12)


def nodes_for(seed: int) -> int:
    return 3 if seed % 2 == 0 else 5


def explain(result: RunResult) -> str:
    lines = [
        f"seed {result.seed} ({result.nodes} nodes) is INVALID; replay with:",
        f"    {result.replay()}",
        result.summary(),
        *result.problems()[:20],
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_acknowledged_write_is_lost_under_faults(seed: int) -> None:
    result = run_cluster(seed, nodes_for(seed))
    assert result.valid, explain(result)
    # The run did something: writes were acknowledged and final reads covered them.
    register = result.register
    assert register.acknowledged_count > 10
    assert register.final_read_count == len(result.owners) * 3
    assert register.present_count + register.superseded_count >= register.acknowledged_count
    assert result.events, "the fault schedule applied no fault"


def test_a_run_without_faults_loses_nothing_and_fails_nothing() -> None:
    result = run_cluster(4242, 5, faults=False)
    assert result.valid, explain(result)
    assert result.register.failed_count == 0
    assert result.register.indeterminate_count == 0
    assert not result.stray_copies


def test_fault_schedules_cover_every_kind_of_fault_and_undo_themselves() -> None:
    duration = WorkloadConfig().duration
    kinds: set[str] = set()
    for seed in SEEDS:
        nodes = [f"n{i}" for i in range(1, nodes_for(seed) + 1)]
        schedule = FaultSchedule.generate(derive_rng(seed, "faults"), nodes, duration)
        again = FaultSchedule.generate(derive_rng(seed, "faults"), nodes, duration)
        assert schedule.faults == again.faults
        faults = list(schedule)
        assert all(0 < f.at < duration for f in faults)
        kinds.update(f.kind for f in faults)
        kinds.update(f"partition:{len(f.groups[0])}" for f in faults if f.kind == "partition")
        # Every node taken down is brought back, and at most one disk is lost.
        down = {n for f in faults if f.kind in ("crash", "wipe-if-up") for n in f.nodes}
        back = {n for f in faults if f.kind == "restart" for n in f.nodes}
        assert down <= back
        armed = [f for f in faults if f.kind in ("crash-after-ack", "wipe-if-up")]
        assert len({f.nodes for f in armed}) <= 1
        assert [f.kind for f in faults].count("cut-off") == [f.kind for f in faults].count(
            "reconnect"
        )
    assert kinds >= {
        "crash",
        "restart",
        "crash-after-ack",
        "crash-after-ack-keep",
        "cut-off",
        "wipe-if-up",
        "partition:1",  # one node isolated
        "partition:2",  # a 2-node minority of 5
        "bridge",
        "drops",
        "duplicates",
        "latency",
        "slow",
        "skew",
    }


# -- determinism -------------------------------------------------------------------------


def _digest_in_subprocess(seed: int, nodes: int, hashseed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvcluster.sim",
            "--seed",
            str(seed),
            "--nodes",
            str(nodes),
            "--digest",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def test_a_seed_replays_exactly_in_process_and_across_processes() -> None:
    seed, nodes = 7, 5
    first = run_cluster(seed, nodes)
    second = run_cluster(seed, nodes)
    assert first.history == second.history
    assert first.records == second.records
    assert first.events == second.events
    assert first.digest() == second.digest()
    other = run_cluster(seed + 1, nodes)
    assert other.digest() != first.digest()
    digests = {_digest_in_subprocess(seed, nodes, h) for h in ("1", "4093")}
    assert digests == {first.digest()}, "runs differ across PYTHONHASHSEED"


# -- the checker catches real loss (planted bugs) -------------------------------------------


def test_checker_reports_loss_when_writes_are_acknowledged_before_w_copies() -> None:
    """``unsafe_ack_before_w``: a node cut off from the others acknowledges writes it
    alone holds; it then loses its disk (the schedule's sharpest fault)."""
    settings = sim_settings(unsafe_ack_before_w=True)
    caught = []
    for seed in PLANTED_SEEDS:
        result = run_cluster(seed, nodes_for(seed), settings)
        assert {a.kind for a in result.register.anomalies} <= {"lost"}, explain(result)
        if result.register.lost:
            assert not result.valid
            caught.append(seed)
    print(f"ack-before-W caught by seeds {caught} of {list(PLANTED_SEEDS)}")
    assert len(caught) >= len(PLANTED_SEEDS) // 3
    assert {nodes_for(s) for s in caught} == {3, 5}


def test_checker_reports_loss_when_siblings_are_resolved_last_write_wins() -> None:
    """``unsafe_lww``: concurrent acknowledged writes are silently dropped."""
    settings = sim_settings(unsafe_lww=True)
    for seed in PLANTED_SEEDS[:6]:
        result = run_cluster(seed, nodes_for(seed), settings)
        assert result.register.lost, explain(result)
        assert not result.valid
        assert {a.kind for a in result.register.anomalies} <= {"lost"}
