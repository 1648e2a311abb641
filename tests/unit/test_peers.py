"""The replication lane: runs of items batched per message, results back per run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvcluster import errors
from kvcluster.net.transport import TransportError
from kvcluster.node.peers import _Lane


class Peer:
    """A fake peer: records each message; replies once released (None per item,
    or ``fail_with`` per item, or raises ``raise_exc``)."""

    def __init__(self) -> None:
        self.messages: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_items: set[int] = set()
        self.raise_exc: Exception | None = None

    def lane(self, batch: int, limit: int) -> _Lane[int, None]:
        """A lane to this peer."""
        return _Lane("p", self.send, batch=batch, limit=limit)

    async def send(self, items: list[int], timeout: float) -> list[Any]:
        self.messages.append(list(items))
        await self.gate.wait()
        if self.raise_exc is not None:
            raise self.raise_exc
        return [errors.Internal(f"bad {i}") if i in self.fail_items else None for i in items]


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[Any]]] = []

    def __call__(self, offset: int, results: list[Any]) -> None:
        self.calls.append((offset, results))

    def results(self) -> dict[int, Any]:
        """Item index -> result, checking no index is delivered twice."""
        out: dict[int, Any] = {}
        for offset, results in self.calls:
            for j, r in enumerate(results):
                assert offset + j not in out
                out[offset + j] = r
        return out


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_long_run_is_sent_in_batches_and_answered_per_run() -> None:
    async def main() -> None:
        peer = Peer()
        peer.fail_items = {7, 300}
        lane = peer.lane(batch=256, limit=10_000)
        sink = Sink()
        lane.submit_many(list(range(600)), deadline=1e9, sink=sink)
        assert len(lane) == 600
        peer.gate.set()
        await settle()
        assert [len(m) for m in peer.messages] == [256, 256, 88]
        assert [i for m in peer.messages for i in m] == list(range(600))
        assert [offset for offset, _ in sink.calls] == [0, 256, 512]
        got = sink.results()
        assert sorted(got) == list(range(600))
        assert {i for i, r in got.items() if r is not None} == {7, 300}
        assert isinstance(got[7], errors.Internal)
        assert len(lane) == 0
        await lane.close()

    asyncio.run(main())


def test_queued_runs_share_a_message_but_are_never_split() -> None:
    async def main() -> None:
        peer = Peer()
        lane = peer.lane(batch=10, limit=1000)
        first = Sink()
        lane.submit_many([0], 1e9, first)  # goes out alone: the sender starts at once
        await settle()
        sinks = [Sink() for _ in range(3)]
        lane.submit_many([1, 2, 3, 4], 1e9, sinks[0])
        lane.submit_many([5, 6, 7, 8], 1e9, sinks[1])
        lane.submit_many([9, 10, 11], 1e9, sinks[2])  # would overflow the 10-item batch
        single = lane.submit(12, 1e9)
        peer.gate.set()
        await settle()
        assert peer.messages == [[0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12]]
        assert [s.calls for s in sinks] == [[(0, [None] * 4)], [(0, [None] * 4)], [(0, [None] * 3)]]
        assert single.result() is None
        await lane.close()

    asyncio.run(main())


def test_expired_items_are_failed_unsent() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        peer = Peer()
        lane = peer.lane(batch=10, limit=100)
        lane.submit_many([0], 1e9, Sink())  # occupies the sender
        await settle()
        late = Sink()
        lane.submit_many([1, 2], loop.time() - 1, late)
        peer.gate.set()
        await settle()
        assert peer.messages == [[0]]
        [(offset, results)] = late.calls
        assert offset == 0 and len(results) == 2
        assert all(isinstance(r, TransportError) for r in results)
        await lane.close()

    asyncio.run(main())


def test_a_full_queue_refuses_a_run_whole() -> None:
    async def main() -> None:
        peer = Peer()
        lane = peer.lane(batch=100, limit=10)
        lane.submit_many(list(range(8)), 1e9, Sink())
        await settle()  # sent, awaiting the reply; queue empty again
        lane.submit_many(list(range(8)), 1e9, Sink())
        with pytest.raises(errors.Overloaded):
            lane.submit_many([1, 2, 3], 1e9, Sink())
        assert len(lane) == 8  # nothing of the refused run was queued
        with pytest.raises(errors.Overloaded):
            for i in range(3):
                lane.submit(i, 1e9)
        assert len(lane) == 10
        await lane.close()
        # an empty queue takes a run larger than the limit (it could never go otherwise)
        big = peer.lane(batch=100, limit=10)
        big.submit_many(list(range(50)), 1e9, Sink())
        assert len(big) == 50
        await big.close()

    asyncio.run(main())


def test_a_failed_send_fails_every_item_and_the_lane_goes_on() -> None:
    async def main() -> None:
        peer = Peer()
        peer.raise_exc = TransportError("p", "connection reset")
        lane = peer.lane(batch=10, limit=100)
        sink = Sink()
        lane.submit_many([1, 2, 3], 1e9, sink)
        peer.gate.set()
        await settle()
        assert [type(r) for r in sink.results().values()] == [TransportError] * 3
        peer.raise_exc = None
        after = lane.submit(4, 1e9)
        await settle()
        assert after.result() is None
        await lane.close()

    asyncio.run(main())


def test_close_fails_what_is_queued_and_skips_cancelled_singles() -> None:
    async def main() -> None:
        peer = Peer()
        lane = peer.lane(batch=1, limit=100)
        lane.submit_many([0], 1e9, Sink())
        await settle()
        queued = Sink()
        lane.submit_many([1, 2], 1e9, queued)  # a run of 2 in a lane of batch 1: 2 runs
        cancelled = lane.submit(3, 1e9)
        cancelled.cancel()
        await lane.close()
        assert queued.calls and all(
            isinstance(r, TransportError) for r in queued.results().values()
        )
        assert sorted(queued.results()) == [0, 1]
        assert peer.messages == [[0]]
        assert len(lane) == 0

    asyncio.run(main())


def test_cancelled_single_is_not_sent() -> None:
    async def main() -> None:
        peer = Peer()
        lane = peer.lane(batch=10, limit=100)
        lane.submit(0, 1e9)
        await settle()
        gone = lane.submit(1, 1e9)
        kept = lane.submit(2, 1e9)
        gone.cancel()
        peer.gate.set()
        await settle()
        assert peer.messages == [[0], [2]]
        assert kept.result() is None
        await lane.close()

    asyncio.run(main())


def test_a_failing_sink_does_not_stop_the_lane(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        peer = Peer()
        peer.gate.set()
        lane = peer.lane(batch=10, limit=100)

        def broken(offset: int, results: list[Any]) -> None:
            raise RuntimeError("bug in a caller")

        lane.submit_many([1], 1e9, broken)
        await settle()
        after = Sink()
        lane.submit_many([2], 1e9, after)
        await settle()
        assert after.calls == [(0, [None])]
        await lane.close()

    asyncio.run(main())
    assert "callback failed" in caplog.text
