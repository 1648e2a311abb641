"""What an anti-entropy repair costs compared with copying a replica's data in full.

    .venv/bin/python -m benchmarks.repair_cost [--keys 50000] [--differ 0.01]

Starts a 3-node dev cluster (N=3, background anti-entropy off, hinted handoff
storing no hints) on ports 7850-7852, writes ``--keys`` keys to every replica,
stops n3, overwrites ``--differ`` of the keys with w=2 (so n3 misses them),
starts n3 again and runs ``kvctl cluster repair`` on it. Because no hints are
kept, only the repair can bring n3 up to date; the benchmark checks that it
did. It then reports:

- the bytes the repair exchanged (``bytes_exchanged`` of kvctl's summary:
  Merkle hashes, key lists of the differing segments, and records, both ways);
- the bytes a full copy of n3's data would move (every stored key and record,
  summed from n1's LMDB store after the cluster is stopped);
- the repair's wall time (kvctl process) and the node's own measure;
- the cost of a second repair of the now identical replicas.

Every step is bounded (``--max-seconds``, default 300); the cluster is stopped
by PID and its data removed on exit, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks`, `kvcluster` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.systems import stop_on_sigterm
from kvcluster import Client, errors
from kvcluster.cli import dev
from kvcluster.client import AllowListPolicy
from kvcluster.storage.base import Table
from kvcluster.storage.lmdb_store import LmdbStorage

BASE_PORT = 7850  # 7850-7852: this benchmark's block
BATCH = 1000  # the node's max_batch_items
KVCTL = [sys.executable, "-m", "kvcluster.cli.kvctl"]
SETTINGS = {"aae_interval": 0, "hint_max_per_target": 0, "metrics_listen": "off"}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the benchmark ran out of its {self.seconds:g}s budget")
        return left

    def wait(self, what: str, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self.left() <= 0.1:
                raise TimeoutError(f"gave up waiting for {what}")
            time.sleep(0.1)


@dataclass
class StoreSize:
    keys: int
    bytes: int  # sum of stored key + record bytes (the actor epoch prefix excluded)


def store_size(data_dir: str) -> StoreSize:
    """Keys and bytes of every record in a stopped node's store."""
    storage = LmdbStorage.open(data_dir, map_size=1 << 34)
    try:
        keys = size = 0
        with storage.read() as view:
            for pkey, raw in view.scan(Table.DATA):
                keys += 1
                size += len(pkey) + len(raw) - 8  # 8: the local actor epoch
        return StoreSize(keys, size)
    finally:
        asyncio.run(storage.close())


def key_of(i: int) -> bytes:
    return b"bench-%07d" % i


def value_of(i: int, version: int, size: int) -> bytes:
    head = b"%07d:v%d:" % (i, version)
    return head + b"x" * max(0, size - len(head))


def put_all(kv: Client, items: Sequence[Any], w: int | str, deadline: Deadline) -> None:
    for start in range(0, len(items), BATCH):
        deadline.left()
        results = kv.put_many(items[start : start + BATCH], w=w, timeout=30.0)
        failed = [r for r in results if isinstance(r, errors.KVError)]
        if failed:
            raise RuntimeError(f"{len(failed)} writes failed, e.g. {failed[0]}")


def connected(addresses: Sequence[str]) -> bool:
    """Every node can reach every other (a read with r=all coordinated by each)."""
    for address in addresses:
        with Client([address], load_balancing=AllowListPolicy([address]), timeout=2.0) as kv:
            try:
                kv.get(b"connectivity-probe", r="all")
            except errors.KVError:
                return False
    return True


def member_down(observer: str, node_id: str) -> bool:
    st = dev.node_status(observer)
    return st is not None and any(m.id == node_id and m.state == "down" for m in st.members)


def repair(node: str, deadline: Deadline) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [*KVCTL, "--nodes", node, "--json", "cluster", "repair", "--node", node],
        capture_output=True,
        text=True,
        timeout=deadline.left(),
        check=False,
    )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"kvctl cluster repair failed ({proc.returncode}): {proc.stderr}")
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary, wall


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    deadline = Deadline(args.max_seconds)
    t = time.monotonic()
    cluster = dev.up(directory, 3, args.base_port, settings=SETTINGS, timeout=60.0)
    addresses = cluster.addresses
    n1, n3 = cluster.node("n1"), cluster.node("n3")
    deadline.wait("the nodes to reach each other", lambda: connected(addresses))
    print(f"cluster up in {time.monotonic() - t:.1f}s", file=sys.stderr)

    t = time.monotonic()
    with Client(addresses, timeout=30.0) as kv:
        put_all(kv, [(key_of(i), value_of(i, 1, args.value_size)) for i in range(args.keys)],
                "all", deadline)  # fmt: skip
    print(f"{args.keys} keys written to all replicas in {time.monotonic() - t:.1f}s",
          file=sys.stderr)  # fmt: skip

    differ = max(1, int(args.keys * args.differ))
    step = args.keys // differ
    changed = [i * step for i in range(differ)]
    dev.kill(directory, "n3", signal.SIGTERM)
    deadline.wait("n1 to see n3 down", lambda: member_down(n1.address, "n3"))
    with Client(addresses[:2], timeout=30.0) as kv:
        reads = kv.get_many([key_of(i) for i in changed], timeout=30.0)
        items = []
        for i, read in zip(changed, reads, strict=True):
            if isinstance(read, errors.KVError):
                raise RuntimeError(f"read of {key_of(i)!r} failed: {read}")
            items.append((key_of(i), value_of(i, 2, args.value_size), read.context))
        put_all(kv, items, 2, deadline)
    print(f"{differ} keys overwritten with w=2 while n3 was down", file=sys.stderr)
    dev.restart(directory, "n3")
    deadline.wait("n3 to be reachable again", lambda: connected(addresses))

    first, first_wall = repair(n3.address, deadline)
    second, second_wall = repair(n3.address, deadline)

    # n3 alone must now hold the new values (nothing else could have told it)
    with Client([n3.address], load_balancing=AllowListPolicy([n3.address])) as kv:
        dev.kill(directory, "n1", signal.SIGTERM)
        dev.kill(directory, "n2", signal.SIGTERM)
        reads = kv.get_many([key_of(i) for i in changed], r=1, timeout=30.0)
        stale = [
            i
            for i, r in zip(changed, reads, strict=True)
            if isinstance(r, errors.KVError) or r.values != [value_of(i, 2, args.value_size)]
        ]
    if stale:
        raise RuntimeError(f"the repair left {len(stale)} keys stale on n3")
    dev.down(directory)
    full = store_size(n1.data_dir)
    return {
        "keys": args.keys,
        "keys_differing": differ,
        "value_bytes": args.value_size,
        "full_copy_keys": full.keys,
        "full_copy_bytes": full.bytes,
        "repair": first,
        "repair_wall_seconds": first_wall,
        "second_repair": second,
        "second_repair_wall_seconds": second_wall,
    }


def table(r: dict[str, Any]) -> str:
    rep, again = r["repair"], r["second_repair"]
    ratio = rep["bytes_exchanged"] / r["full_copy_bytes"]
    rows = [
        ("keys in the cluster (N=3)", f"{r['keys']:,}"),
        ("keys differing on n3", f"{r['keys_differing']:,}"),
        ("full copy of n3's data", f"{r['full_copy_bytes']:,} B ({r['full_copy_keys']:,} keys)"),
        ("repair: bytes exchanged", f"{rep['bytes_exchanged']:,} B ({ratio:.2%} of a full copy)"),
        ("repair: keys compared / exchanged / repaired",
         f"{rep['keys_compared']:,} / {rep['keys_exchanged']:,} / {rep['keys_repaired']:,}"),
        ("repair: partitions compared", f"{rep['partitions_compared']}"),
        ("repair: wall time (kvctl)", f"{r['repair_wall_seconds']:.2f} s"),
        ("repair: time on the node", f"{rep['seconds']:.2f} s"),
        ("second repair (identical): bytes", f"{again['bytes_exchanged']:,} B"),
        ("second repair: wall time (kvctl)", f"{r['second_repair_wall_seconds']:.2f} s"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--differ", type=float, default=0.01, help="fraction of keys n3 misses")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument("--base-port", type=int, default=BASE_PORT)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="budget for the run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.differ <= 1 or args.keys < 1:
        parser.error("need --keys >= 1 and 0 < --differ <= 1")
    stop_on_sigterm()
    directory = Path(tempfile.mkdtemp(prefix="kvcluster-repair-cost-"))
    try:
        result = run(args, directory)
    finally:
        if (directory / dev.STATE_FILE).exists():
            dev.down(directory)
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table(result))
    if result["repair"]["bytes_exchanged"] * 10 > result["full_copy_bytes"]:
        print("repair_cost: the repair moved more than a tenth of a full copy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
