"""SIGKILL a process that is streaming writes into LmdbStorage: no acknowledged write is lost.

The child (the script below) runs concurrent writers; each prints a line for a
write only after its ``await storage.write(...)`` returned, i.e. after the
write was acknowledged. The test kills the child with SIGKILL at a point drawn
from a fixed seed, reopens the store and checks every printed write. The same
store is reused across rounds, so each round also starts from a store that was
killed mid-write.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcluster.storage.base import Table
from kvcluster.storage.lmdb_store import LmdbStorage

pytestmark = pytest.mark.integration

SEED = 1_720_613
ROUNDS = 5
WRITERS = 16
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # a safety net against hanging, never an assertion

CHILD = r"""
import asyncio
import hashlib
import sys

from kvcluster.storage.base import Table
from kvcluster.storage.lmdb_store import LmdbStorage

path, round_, writers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def key_of(w, i):
    key = b"r%d-w%02d-%08d" % (round_, w, i)
    return key + b"L" * 700 if i % 5 == 4 else key  # some keys beyond LMDB's 511 bytes


def value_of(key, i):
    block = hashlib.sha256(key).digest()
    return block * (70_000 // 32 if i % 37 == 0 else 1 + i % 50)


async def writer(storage, w):
    i = 0
    while True:
        key, value, last = key_of(w, i), value_of(key_of(w, i), i), b"%d" % i

        def fn(view, key=key, value=value, last=last):
            view.put(Table.DATA, key, value)
            view.put(Table.META, b"last-r%d-w%02d" % (round_, w), last)

        await storage.write(fn)
        sys.stdout.write("%d %d\n" % (w, i))
        sys.stdout.flush()
        i += 1


async def main():
    storage = LmdbStorage.open(path, map_size=1 << 30)
    await asyncio.gather(*(writer(storage, w) for w in range(writers)))


asyncio.run(main())
"""


def _key_of(round_: int, w: int, i: int) -> bytes:
    key = b"r%d-w%02d-%08d" % (round_, w, i)
    return key + b"L" * 700 if i % 5 == 4 else key


def _value_of(key: bytes, i: int) -> bytes:
    import hashlib

    block = hashlib.sha256(key).digest()
    return block * (70_000 // 32 if i % 37 == 0 else 1 + i % 50)


def _acknowledged(out: Path) -> list[tuple[int, int]]:
    """The complete lines the child printed (a line cut by the kill is ignored)."""
    text = out.read_text()
    lines = text.split("\n")[:-1]  # the last element is "" or a partial line
    return [(int(w), int(i)) for w, i in (line.split() for line in lines)]


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    print(f"storage crash test seed={SEED}")
    rng = random.Random(SEED)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acked_by_round: dict[int, list[tuple[int, int]]] = {}

    for round_ in range(ROUNDS):
        kill_after = rng.uniform(0.02, 0.8)  # seconds of streaming before the kill
        out = tmp_path / f"acks-{round_}.txt"
        with out.open("w") as stdout:
            child = subprocess.Popen(
                [sys.executable, str(script), str(store_dir), str(round_), str(WRITERS)],
                stdout=stdout,
                env=env,
                cwd=tmp_path,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not out.read_text() and time.monotonic() < deadline:  # first acknowledgement
                assert child.poll() is None, f"child exited early with {child.returncode}"
                time.sleep(0.005)
            time.sleep(kill_after)
            assert child.poll() is None, f"child exited early with {child.returncode}"
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
        assert child.returncode == -signal.SIGKILL
        acked = _acknowledged(out)
        assert acked, "the child acknowledged nothing before it was killed"
        acked_by_round[round_] = acked
        print(f"round {round_}: killed after {kill_after:.3f}s, {len(acked)} acknowledged")

        storage = LmdbStorage.open(store_dir, map_size=1 << 30)
        try:
            with storage.read() as view:
                for r, writes in acked_by_round.items():
                    last: dict[int, int] = {}
                    for w, i in writes:
                        key = _key_of(r, w, i)
                        assert view.get(Table.DATA, key) == _value_of(key, i), (SEED, r, w, i)
                        last[w] = max(last.get(w, -1), i)
                    for w, i in last.items():
                        stored = view.get(Table.META, b"last-r%d-w%02d" % (r, w))
                        assert stored is not None
                        assert int(stored) >= i, (SEED, r, w)
                scanned = sum(1 for _ in view.scan(Table.DATA, prefix=b"r%d-" % round_))
                assert scanned >= len(acked)
        finally:
            _close(storage)


def _close(storage: LmdbStorage) -> None:
    import asyncio

    asyncio.run(storage.close())
