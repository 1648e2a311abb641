"""Short fault-injection campaigns through the ``jepsen-lite`` command line.

Each campaign starts a real 3-node cluster, runs a workload for a few seconds
under a nemesis, heals, repairs, checks and writes a report. The safe runs must be
valid; the runs against a deliberately unsafe configuration must be reported
invalid with the damage listed (the checkers are only trusted because they catch
these planted bugs). The netns campaigns need root, ``ip`` and ``iptables`` and
are skipped, with the reason printed, without them; CI runs as root.

The whole file is one short campaign: the runs are started together on first use,
at most :data:`PARALLEL` at a time (each local run takes its own ports; netns runs
queue on the backend's lock), and each test waits for its own. Every run is
bounded by ``--time-limit`` and by a hang guard on the subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

JEPSEN_LITE = Path(sys.executable).with_name("jepsen-lite")
#: A hang guard for one run, never a performance assertion.
HANG_GUARD = 300.0
PARALLEL = 3


@dataclass(frozen=True)
class Run:
    out: Path
    code: int
    stdout: str
    stderr: str

    @property
    def results(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "results.json").read_text())
        return data

    def explain(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def jepsen_lite(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLUSTER_")}
    return subprocess.run(
        [str(JEPSEN_LITE), *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        env=env,
        check=False,
    )


def campaign(out: Path, *args: str) -> Run:
    proc = jepsen_lite("run", "--out", str(out), "--concurrency", "6", *args)
    return Run(out, proc.returncode, proc.stdout, proc.stderr)


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "netns campaigns need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"netns campaigns need '{tool}'"
    return None


# name -> jepsen-lite run arguments
LOCAL = {
    "local-set": ["--backend", "local", "--workload", "set", "--nemesis", "partition,kill,pause",
                  "--time-limit", "8", "--seed", "1"],
    "local-register": ["--backend", "local", "--workload", "register", "--nemesis", "all",
                       "--time-limit", "8", "--seed", "2"],
    "local-lin": ["--backend", "local", "--workload", "lin-register",
                  "--nemesis", "partition,kill,pause", "--time-limit", "8", "--seed", "3"],
    "local-lin-one": ["--backend", "local", "--workload", "lin-register", "--nemesis", "latency",
                      "--time-limit", "8", "--seed", "15", "--option", "read_quorum=one"],
    "local-lww": ["--backend", "local", "--workload", "set", "--nemesis", "none",
                  "--time-limit", "5", "--seed", "4", "--unsafe", "lww"],
    "local-ack": ["--backend", "local", "--workload", "set", "--nemesis", "partition",
                  "--time-limit", "8", "--seed", "5", "--unsafe", "ack-before-w"],
    "local-reg-lww": ["--backend", "local", "--workload", "register", "--nemesis", "none",
                      "--time-limit", "5", "--seed", "6", "--unsafe", "lww"],
}  # fmt: skip
NETNS = {
    "netns-set": ["--backend", "netns", "--workload", "set",
                  "--nemesis", "partition,kill,pause,loss", "--time-limit", "8", "--seed", "7"],
    "netns-register": ["--backend", "netns", "--workload", "register",
                       "--nemesis", "partition,kill,pause", "--time-limit", "8", "--seed", "8"],
    "netns-ack": ["--backend", "netns", "--workload", "set", "--nemesis", "partition",
                  "--time-limit", "8", "--seed", "9", "--unsafe", "ack-before-w"],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Run]]]:
    """Every campaign of this module, started together (PARALLEL at a time)."""
    base = tmp_path_factory.mktemp("campaigns")
    # netns runs share one bridge and queue on one lock: one at a time, beside the
    # local ones.
    with (
        ThreadPoolExecutor(max_workers=PARALLEL - 1) as local,
        ThreadPoolExecutor(max_workers=1) as netns,
    ):
        futures = {name: local.submit(campaign, base / name, *args) for name, args in LOCAL.items()}
        if netns_skip_reason() is None:
            for name, args in NETNS.items():
                futures[name] = netns.submit(campaign, base / name, *args)
        yield futures
        for f in futures.values():
            f.cancel()


def result(runs: dict[str, Future[Run]], name: str) -> Run:
    return runs[name].result(timeout=4 * HANG_GUARD)


# ----------------------------------------------------------------------------- local


@pytest.mark.integration
def test_local_set_campaign_is_valid(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-set")
    assert run.code == 0, run.explain()
    r = run.results
    assert r["verdict"] == "valid" and r["anomaly_count"] == 0
    s = r["summary"]
    assert s["acknowledged_adds"] >= 200, s  # a real workload ran, not a handful of ops
    assert s["lost"] == 0 and s["stale"] == 0
    assert r["checkers"]["convergence"]["valid"] is True
    assert r["checkers"]["set"]["final_read_count"] == s["keys"]
    # the nemesis did something and everything was healed
    events = [json.loads(x) for x in (run.out / "nemesis.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["type"] == "start"]
    ends = [e for e in events if e["type"] == "end"]
    assert starts and len(starts) == len(ends)
    assert {e["name"] for e in events if e["type"] == "phase"} >= {
        "workload", "heal", "drain", "repair", "final-reads", "check",
    }  # fmt: skip
    assert (run.out / "report.html").stat().st_size > 10_000


@pytest.mark.integration
def test_check_command_recomputes_the_verdict(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-set")
    before = run.results
    (run.out / "results.json").unlink()  # so a check that wrote nothing cannot pass
    proc = jepsen_lite("check", str(run.out), "--no-report")
    assert proc.returncode == 0, proc.stderr
    after = run.results
    assert after["verdict"] == before["verdict"] == "valid"
    assert after["summary"] == before["summary"]


@pytest.mark.integration
def test_local_register_all_nemeses_is_valid(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-register")
    assert run.code == 0, run.explain()
    s = run.results["summary"]
    assert s["acknowledged_writes"] >= 200, s
    assert s["lost"] == 0 and s["read_your_writes_violations"] == 0
    assert s["present_in_final_reads"] >= 1


@pytest.mark.integration
def test_local_lin_register_is_linearizable(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-lin")
    assert run.code == 0, run.explain()
    s = run.results["summary"]
    assert s["acknowledged_writes"] >= 5, s  # r = all: unavailable while a node is down
    assert s["linearizable_keys"] == s["keys"] and not s["non_linearizable_keys"]


@pytest.mark.integration
def test_one_replica_reads_are_caught_not_linearizable(runs: dict[str, Future[Run]]) -> None:
    # R = 1, W = 2 of 3 (R + W = N): a read that reaches the replica a write landed
    # on first sees it, and a later read that asks another replica does not. Under
    # the latency nemesis this happens on about ten keys per 8 s run, so the run
    # is invalid every time and the checker must say why. (R = W = 2 is not
    # linearizable either, Dynamo quorums not being atomic, but its window is one
    # replication delay: 1 run in 3 of this length showed it, too rare to assert.)
    run = result(runs, "local-lin-one")
    assert run.code == 1, run.explain()
    r = run.results
    bad = [a for a in r["anomalies"] if a["kind"] == "not-linearizable"]
    assert bad and r["summary"]["non_linearizable_keys"]
    cex = bad[0]["counterexample"]
    assert cex["op"]["invoke"]["f"] == "read" and cex["op"]["completion"]["type"] == "ok"
    assert cex["prefix"]  # the linearizable prefix that the read cannot follow


@pytest.mark.integration
def test_unsafe_lww_is_caught_losing_acknowledged_adds(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-lww")
    assert run.code == 1, run.explain()
    r = run.results
    assert r["verdict"] == "invalid"
    lost = [a for a in r["anomalies"] if a["kind"] == "lost"]
    assert lost and r["summary"]["lost"] == len(r["summary"]["lost_elements"]) > 0
    # every lost element is listed with the acknowledged add and the final read missing it
    a = lost[0]
    assert a["add"]["completion"]["type"] == "ok" and a["add"]["invoke"]["value"] == a["element"]
    assert a["reads"] and a["element"] not in a["reads"][0]["value"]
    assert a["reads"][0]["type"] == "ok"
    assert '"lost"' in run.stdout  # the command line prints the summary


@pytest.mark.integration
def test_unsafe_ack_before_w_is_caught_by_reads_after_the_ack(
    runs: dict[str, Future[Run]],
) -> None:
    run = result(runs, "local-ack")
    assert run.code == 1, run.explain()
    r = run.results
    stale = [a for a in r["anomalies"] if a["kind"] == "stale"]
    assert stale, r["anomaly_kinds"]
    a = stale[0]
    add_done = a["add"]["completion"]
    assert add_done["type"] == "ok"
    # the reads that missed it began after the add was acknowledged
    assert all(
        rd["time"] > add_done["time"] and a["element"] not in rd["value"] for rd in a["reads"]
    )


@pytest.mark.integration
def test_unsafe_lww_register_loses_siblings(runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "local-reg-lww")
    assert run.code == 1, run.explain()
    r = run.results
    assert r["summary"]["lost"] > 0 and r["summary"]["lost_values"]
    lost = [a for a in r["anomalies"] if a["kind"] == "lost"]
    assert lost and lost[0]["ops"][1]["type"] == "ok"


# ----------------------------------------------------------------------------- report


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.integration
def test_report_renders_in_headless_chromium(runs: dict[str, Future[Run]], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        reason = "no chromium (Debian: apt-get install chromium; CI installs it)"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    report = result(runs, "local-set").out / "report.html"
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
            "--window-size=1300,2400", f"--screenshot={shot}", report.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.exists(), proc.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    pixels = (mpimg.imread(str(shot))[..., :3] * 255).astype(np.int16)
    height, width, _ = pixels.shape
    assert (height, width) == (2400, 1300)
    # The page colours its top-right square green once every plot has decoded with
    # a non-zero natural size (red if one failed).
    corner = pixels[4:20, width - 20 : width - 4].reshape(-1, 3)
    assert (np.abs(corner - np.array([0, 200, 0])) <= 8).all(), corner[:3]
    # The screenshot is not blank: the plots bring many distinct colours.
    flat = pixels.reshape(-1, 3)
    colours = np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0)
    assert len(colours) > 50, len(colours)
    assert float(flat.std()) > 10.0


# ----------------------------------------------------------------------------- netns


@pytest.fixture
def netns_ok() -> None:
    reason = netns_skip_reason()
    if reason is not None:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)


def _netns_clean() -> None:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    assert "kvj-" not in out("ip", "netns", "list")
    links = out("ip", "-o", "link", "show")
    assert "kvj0" not in links and "kvjh" not in links
    assert "jepsen-lite" not in out("iptables", "-S", "FORWARD")


@pytest.mark.system
def test_netns_set_campaign_is_valid(netns_ok: None, runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "netns-set")
    assert run.code == 0, run.explain()
    s = run.results["summary"]
    assert s["acknowledged_adds"] >= 100 and s["lost"] == 0 and s["stale"] == 0, s


@pytest.mark.system
def test_netns_register_campaign_is_valid(netns_ok: None, runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "netns-register")
    assert run.code == 0, run.explain()
    s = run.results["summary"]
    assert s["acknowledged_writes"] >= 100 and s["lost"] == 0, s


@pytest.mark.system
def test_netns_unsafe_ack_before_w_is_caught(netns_ok: None, runs: dict[str, Future[Run]]) -> None:
    run = result(runs, "netns-ack")
    assert run.code == 1, run.explain()
    assert run.results["summary"]["stale"] > 0


@pytest.mark.system
def test_netns_leaves_nothing_behind(netns_ok: None, runs: dict[str, Future[Run]]) -> None:
    for name in NETNS:
        result(runs, name)
    _netns_clean()
